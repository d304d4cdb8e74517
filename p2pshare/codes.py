"""The two forms an offer is handed over in: a spoken one-time code and a QR URI.

Spoken code: ``<offer number>-<word>-<word>-<word>-<word>``, e.g. ``7-glisten-ivory-sardine-utility``.
The words come from the EFF short word list #2 (shipped in the ``xkcdpass`` package): 1,295
words (``yo-yo`` is dropped, it would clash with our separator), every word has a unique
three-letter prefix and differs from every other by an edit distance of at least three, which is
what makes it good to read aloud over a noisy phone line: the listener may type just the first
three letters, and a misheard word is still recognised. Four words carry 41.3 bits of secret.
The number only tells the sending node which offer is meant; it is part of the PAKE password too.

QR URI: ``p2pshare://offer/<offer id>?v=1&n=<sender name>&fp=<fingerprint>&exp=<unix time>&a=<host:port>…#<secret>``.
The 256-bit secret sits in the fragment, which browsers and HTTP clients never send to a server.

Both forms are only ever used as the password of a SPAKE2 exchange, so a wrong guess learns
nothing and a recorded exchange cannot be attacked offline.
"""

from __future__ import annotations

import base64
import importlib.resources
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from p2pshare.errors import CodeFormatError

WORDS_PER_CODE = 4
QR_SECRET_BYTES = 32
URI_SCHEME = "p2pshare"

Entropy = Callable[[int], bytes]


@cache
def wordlist() -> tuple[str, ...]:
    text = (importlib.resources.files("xkcdpass") / "static" / "eff-special").read_text("utf-8")
    words = tuple(w for w in text.split() if w.isalpha() and w.islower())
    if len(words) < 1024 or len({w[:3] for w in words}) != len(words):
        raise RuntimeError("the installed xkcdpass word list is not the expected EFF list #2")
    return words


@cache
def _by_prefix() -> dict[str, str]:
    return {w[:3]: w for w in wordlist()}


def secret_bits() -> float:
    import math

    return WORDS_PER_CODE * math.log2(len(wordlist()))


def _uniform(entropy: Entropy, n: int) -> int:
    """A uniform integer in [0, n) by rejection sampling (no modulo bias)."""
    limit = (1 << 32) - ((1 << 32) % n)
    while True:
        value = int.from_bytes(entropy(4), "big")
        if value < limit:
            return value % n


def new_spoken_code(number: int, entropy: Entropy) -> str:
    words = wordlist()
    picked = [words[_uniform(entropy, len(words))] for _ in range(WORDS_PER_CODE)]
    return "-".join([str(number), *picked])


@dataclass(frozen=True)
class SpokenCode:
    number: int
    words: tuple[str, ...]

    @property
    def text(self) -> str:
        return "-".join([str(self.number), *self.words])

    @property
    def password(self) -> bytes:
        return b"p2pshare spoken:" + self.text.encode("ascii")


def parse_spoken(text: str) -> SpokenCode:
    """Parse a code as a person typed it: any case, spaces/hyphens/dots, 3-letter prefixes."""
    tokens = [t for t in re.split(r"[\s\-_.,/]+", text.strip().lower()) if t]
    # isascii: str.isdigit() also accepts digits like "²" that int() refuses
    if not tokens or not (tokens[0].isascii() and tokens[0].isdigit()):
        raise CodeFormatError(
            "a spoken code starts with the offer number, e.g. 7-glisten-ivory-sardine-utility"
        )
    number = int(tokens[0])
    if not 0 < number < 1_000_000:
        raise CodeFormatError("the offer number at the start of the code is out of range")
    raw_words = tokens[1:]
    if len(raw_words) != WORDS_PER_CODE:
        raise CodeFormatError(
            f"the code has {len(raw_words)} words after the number; it should have "
            f"{WORDS_PER_CODE}. Ask the sender to read it again"
        )
    lookup = _by_prefix()
    words: list[str] = []
    for i, w in enumerate(raw_words, 1):
        if not w.isalpha() or len(w) < 3 or w[:3] not in lookup:
            raise CodeFormatError(
                f"word {i} ('{w[:20]}') is not in the code word list; ask the sender to spell it"
            )
        full = lookup[w[:3]]
        if not full.startswith(w) and _distance(w, full) > 2:
            raise CodeFormatError(
                f"word {i} ('{w[:20]}') is not in the code word list; ask the sender to spell it"
            )
        words.append(full)
    return SpokenCode(number, tuple(words))


def _distance(a: str, b: str) -> int:
    """Levenshtein distance, for forgiving a small typo in a long word."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@dataclass(frozen=True)
class QrOffer:
    offer_id: str
    secret: bytes
    sender_name: str = ""
    fingerprint: str = ""
    expires: int = 0
    addresses: tuple[str, ...] = field(default_factory=tuple)

    @property
    def password(self) -> bytes:
        return b"p2pshare qr:" + self.secret

    def uri(self) -> str:
        query = urlencode(
            [
                ("v", "1"),
                ("n", self.sender_name),
                ("fp", self.fingerprint),
                ("exp", str(self.expires)),
            ]
            + [("a", a) for a in self.addresses]
        )
        secret = base64.urlsafe_b64encode(self.secret).rstrip(b"=").decode("ascii")
        return f"{URI_SCHEME}://offer/{quote(self.offer_id)}?{query}#{secret}"


_OFFER_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_ADDR_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]{1,253}):[0-9]{1,5}$")


def parse_qr_uri(text: str) -> QrOffer:
    """Parse a scanned or pasted QR URI. Raises CodeFormatError with what looks wrong."""
    parts = urlsplit(text.strip())
    if parts.scheme != URI_SCHEME or parts.netloc != "offer":
        raise CodeFormatError(
            "this is not a p2pshare offer link (it should start p2pshare://offer/)"
        )
    offer_id = parts.path.strip("/")
    if not _OFFER_ID_RE.fullmatch(offer_id):
        raise CodeFormatError("the offer link is damaged (bad offer id); scan it again")
    try:
        secret = base64.urlsafe_b64decode(parts.fragment + "=" * (-len(parts.fragment) % 4))
    except (ValueError, TypeError) as exc:
        raise CodeFormatError("the offer link is damaged (bad secret); scan it again") from exc
    if len(secret) < 16:
        raise CodeFormatError("the offer link is incomplete (its secret is missing); scan it again")
    q = parse_qs(parts.query)
    # An address is host:port, or relay:host:port for the sender's relay (docs/relay.md);
    # anything else is dropped, as older versions drop the relay form.
    addresses = tuple(
        a
        for a in q.get("a", [])
        if _ADDR_RE.fullmatch(a) or (a.startswith("relay:") and _ADDR_RE.fullmatch(a[6:]))
    )
    try:
        expires = int(q.get("exp", ["0"])[0])
    except ValueError:
        expires = 0
    return QrOffer(
        offer_id=offer_id,
        secret=secret,
        sender_name=q.get("n", [""])[0][:200],
        fingerprint=q.get("fp", [""])[0][:64],
        expires=expires,
        addresses=addresses,
    )


def parse_any(text: str) -> SpokenCode | QrOffer:
    """A receiver may paste either form."""
    if text.strip().lower().startswith(URI_SCHEME + ":"):
        return parse_qr_uri(text)
    return parse_spoken(text)


def is_address(text: str) -> bool:
    return bool(_ADDR_RE.fullmatch(text))
