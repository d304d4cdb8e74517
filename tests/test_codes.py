"""The two hand-over forms of an offer: the spoken code and the QR URI."""

from __future__ import annotations

import base64
import random
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pshare import codes
from p2pshare.errors import CodeFormatError


def seeded(seed: int):
    return random.Random(seed).randbytes


def script(*values: int):
    """Entropy that returns the given 32-bit values in order."""
    it = iter(values)
    return lambda n: next(it).to_bytes(n, "big")


# -- the word list ---------------------------------------------------------------------------------


def test_wordlist_is_the_eff_short_list_2_without_the_hyphenated_word():
    words = codes.wordlist()
    assert len(words) == 1295
    assert all(w.isalpha() and w.islower() and w.isascii() for w in words)
    assert len({w[:3] for w in words}) == len(words)  # unique three-letter prefixes
    assert "yo-yo" not in words
    assert words[0] == "aardvark" and words[-1] == "zucchini"


def test_a_code_carries_at_least_40_bits():
    assert codes.secret_bits() >= 40
    assert codes.secret_bits() == pytest.approx(4 * 10.338, abs=0.01)


# -- generating codes ------------------------------------------------------------------------------


def test_new_spoken_code_is_a_number_and_four_list_words():
    code = codes.new_spoken_code(7, seeded(1))
    number, *words = code.split("-")
    assert number == "7"
    assert len(words) == codes.WORDS_PER_CODE == 4
    assert all(w in codes.wordlist() for w in words)


def test_new_spoken_code_is_determined_by_the_injected_entropy():
    assert codes.new_spoken_code(7, seeded(1)) == codes.new_spoken_code(7, seeded(1))
    assert codes.new_spoken_code(7, seeded(1)) != codes.new_spoken_code(7, seeded(2))
    words = codes.wordlist()
    assert codes.new_spoken_code(12, script(0, 5, 1294, 1295)) == (
        f"12-{words[0]}-{words[5]}-{words[1294]}-{words[0]}"  # 1295 ≡ 0 (mod 1295)
    )


def test_new_spoken_code_rejects_biased_values():
    # 2**32 is not a multiple of 1295: values ≥ 2**32 - 81 would favour the first 81 words
    words = codes.wordlist()
    limit = (1 << 32) - ((1 << 32) % 1295)
    code = codes.new_spoken_code(1, script(limit, (1 << 32) - 1, 3, 4, 5, 6))
    assert code == f"1-{words[3]}-{words[4]}-{words[5]}-{words[6]}"
    code = codes.new_spoken_code(1, script(limit - 1, 0, 0, 0))
    assert code.split("-")[1] == words[(limit - 1) % 1295]


def test_spoken_codes_spread_over_the_list():
    rng = seeded(5)
    seen = set()
    for _ in range(300):
        seen.update(codes.new_spoken_code(1, rng).split("-")[1:])
    assert len(seen) > 500  # 1200 draws from 1295 words


# -- parsing what a person typed ---------------------------------------------------------------------

CODE = "7-glisten-ivory-sardine-utility"


@pytest.mark.parametrize(
    "typed",
    [
        CODE,
        "7-GLISTEN-Ivory-sardine-UTILITY",
        "  7 glisten ivory sardine utility  ",
        "7_glisten_ivory_sardine_utility",
        "7.glisten.ivory.sardine.utility",
        "7, glisten, ivory / sardine -- utility",
        "7\tglisten\nivory sardine utility",
        "7 gli ivo sar uti",  # three-letter prefixes
        "7 glis ivor sardi utilit",  # any prefix of three letters or more
        "7 glisten ivory sardine utiltiy",  # transposed letters: two edits, after the prefix
        "7 glisten ivory sardime utility",  # one wrong letter
        "7 glisten ivory sardinne utility",  # one letter too many
        "7 glisten ivory sardne utility",  # one letter missing
        "007-glisten-ivory-sardine-utility",  # leading zeros on the number
    ],
)
def test_parse_spoken_is_forgiving(typed):
    parsed = codes.parse_spoken(typed)
    assert parsed == codes.SpokenCode(7, ("glisten", "ivory", "sardine", "utility"))
    assert parsed.text == CODE
    assert parsed.password == b"p2pshare spoken:" + CODE.encode()


@pytest.mark.parametrize(
    "typed, fragment",
    [
        ("glisten-ivory-sardine-utility", "starts with the offer number"),
        ("", "starts with the offer number"),
        ("seven glisten ivory sardine utility", "starts with the offer number"),
        ("²-glisten-ivory-sardine-utility", "starts with the offer number"),
        ("0-glisten-ivory-sardine-utility", "out of range"),
        ("1000000-glisten-ivory-sardine-utility", "out of range"),
        ("7-glisten-ivory-sardine", "has 3 words after the number; it should have 4"),
        ("7-glisten-ivory-sardine-utility-extra", "has 5 words after the number"),
        ("7", "has 0 words"),
        ("7-glisten-ivory-sardine-qqq", "word 4 ('qqq')"),
        ("7-glisten-iv-sardine-utility", "word 2 ('iv')"),
        ("7-glisten-ivory-5ardine-utility", "word 3"),
        ("7-glisten-ivory-sardine-utilityxyz", "word 4"),  # three edits
        ("7-g1isten-ivory-sardine-utility", "word 1"),  # a digit for a letter
        ("7-xlisten-ivory-sardine-utility", "word 1"),  # a typo inside the 3-letter prefix
    ],
)
def test_parse_spoken_refuses_with_a_helpful_message(typed, fragment):
    with pytest.raises(CodeFormatError) as info:
        codes.parse_spoken(typed)
    assert fragment in str(info.value)
    assert info.value.code == "code-format"


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), number=st.integers(1, 999_999), data=st.data())
def test_every_generated_code_survives_sloppy_typing(seed, number, data):
    code = codes.new_spoken_code(number, seeded(seed))
    num, *words = code.split("-")
    sep = data.draw(st.sampled_from([" ", "-", "_", ".", "  ", " - "]))
    typed_words = []
    for w in words:
        cut = data.draw(st.integers(3, len(w)))
        typed = w[:cut]
        if data.draw(st.booleans()):
            typed = typed.upper()
        typed_words.append(typed)
    parsed = codes.parse_spoken(sep.join([num, *typed_words]))
    assert parsed.text == code
    assert parsed.number == number


# -- QR URIs -----------------------------------------------------------------------------------------

OFFER_ID = "0123456789abcdef0123456789abcdef"
SECRET = bytes(range(32))


def _offer(**kw) -> codes.QrOffer:
    base = dict(
        offer_id=OFFER_ID,
        secret=SECRET,
        sender_name="St. Mary's ED & Trauma",
        fingerprint="SOZ4-5RVN-PDIR-3PV5-WP76-ZXZT",
        expires=1_700_000_600,
        addresses=("10.0.0.5:8443", "[fe80::1]:8443", "pacs-gw.hospital.example:443"),
    )
    base.update(kw)
    return codes.QrOffer(**base)


def test_qr_uri_round_trip():
    offer = _offer()
    uri = offer.uri()
    assert uri.startswith("p2pshare://offer/" + OFFER_ID + "?v=1&")
    assert codes.parse_qr_uri(uri) == offer
    assert codes.parse_any(uri) == offer
    assert offer.password == b"p2pshare qr:" + SECRET


def test_qr_secret_is_only_in_the_fragment():
    offer = _offer()
    uri = offer.uri()
    parts = urlsplit(uri)
    b64 = base64.urlsafe_b64encode(SECRET).rstrip(b"=").decode()
    assert parts.fragment == b64
    assert b64 not in parts.query and b64 not in parts.path
    assert uri.count(b64) == 1
    assert set(parse_qs(parts.query)) == {"v", "n", "fp", "exp", "a"}
    assert codes.QR_SECRET_BYTES * 8 >= 128


def test_qr_secret_must_carry_at_least_128_bits():
    assert codes.parse_qr_uri(_offer(secret=bytes(16)).uri()).secret == bytes(16)
    with pytest.raises(CodeFormatError) as info:
        codes.parse_qr_uri(_offer(secret=bytes(15)).uri())
    assert "secret is missing" in str(info.value)


@pytest.mark.parametrize(
    "uri, fragment",
    [
        ("https://offer/" + OFFER_ID + "#AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "not a p2pshare offer"),
        ("p2pshare://other/" + OFFER_ID + "#AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "not a p2pshare"),
        ("p2pshare://offer/" + OFFER_ID[:-1] + "#" + "A" * 43, "bad offer id"),
        ("p2pshare://offer/" + OFFER_ID.upper() + "#" + "A" * 43, "bad offer id"),
        ("p2pshare://offer/" + "g" * 32 + "#" + "A" * 43, "bad offer id"),
        ("p2pshare://offer/../" + OFFER_ID + "#" + "A" * 43, "bad offer id"),
        ("p2pshare://offer/" + OFFER_ID + "?v=1", "secret is missing"),
        ("p2pshare://offer/" + OFFER_ID + "?v=1#", "secret is missing"),
        ("p2pshare://offer/" + OFFER_ID + "?v=1#AAAA", "secret is missing"),
        ("p2pshare://offer/" + OFFER_ID + "?v=1#ÄÖÜ" + "A" * 40, "bad secret"),
        ("p2pshare://offer/" + OFFER_ID + "?v=1#" + "A" * 41, "bad secret"),
        ("", "not a p2pshare"),
    ],
)
def test_damaged_qr_uri_is_refused(uri, fragment):
    with pytest.raises(CodeFormatError) as info:
        codes.parse_qr_uri(uri)
    assert fragment in str(info.value)


def test_qr_uri_tolerates_damaged_optional_fields():
    uri = (
        f"p2pshare://offer/{OFFER_ID}?v=1&n={'N' * 300}&exp=soon&a=evil host:1&a=10.0.0.1:99"
        f"&a=10.0.0.2&a=10.0.0.3:1%0A&fp={'F' * 100}#"
        + base64.urlsafe_b64encode(SECRET).rstrip(b"=").decode()
    )
    offer = codes.parse_qr_uri("  " + uri + "\n")
    assert offer.secret == SECRET
    assert offer.expires == 0
    assert offer.addresses == ("10.0.0.1:99",)  # malformed addresses are dropped
    assert offer.sender_name == "N" * 200
    assert offer.fingerprint == "F" * 64


def test_parse_any_dispatches_on_the_scheme():
    assert codes.parse_any(CODE) == codes.parse_spoken(CODE)
    assert codes.parse_any("P2PSHARE://offer/" + OFFER_ID + "#" + "A" * 43).offer_id == OFFER_ID
    with pytest.raises(CodeFormatError):
        codes.parse_any("p2pshare:nonsense")


@pytest.mark.parametrize(
    "text, ok",
    [
        ("10.0.0.1:8443", True),
        ("[fe80::1]:1", True),
        ("host.example:65535", True),
        ("host.example", False),
        ("evil host:1", False),
        ("10.0.0.1:123456", False),
        ("a/b:1", False),
        ("10.0.0.1:99\n", False),
    ],
)
def test_is_address(text, ok):
    assert codes.is_address(text) is ok


addresses = st.one_of(
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(1, 65535)).map(
        lambda t: f"10.{t[0]}.{t[1]}.1:{t[2]}"
    ),
    st.from_regex(r"[a-z][a-z0-9\-]{0,20}(\.[a-z]{2,5}){0,2}", fullmatch=True).map(
        lambda h: h + ":443"
    ),
    st.just("[::1]:9000"),
)


@settings(max_examples=80, deadline=None)
@given(
    offer_id=st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
    secret=st.binary(min_size=16, max_size=64),
    name=st.text(max_size=200),
    fingerprint=st.text(max_size=64),
    expires=st.integers(0, 2**40),
    addrs=st.lists(addresses, max_size=4).map(tuple),
)
def test_qr_uri_round_trip_property(offer_id, secret, name, fingerprint, expires, addrs):
    offer = codes.QrOffer(offer_id, secret, name, fingerprint, expires, addrs)
    uri = offer.uri()
    assert codes.parse_qr_uri(uri) == offer
    parts = urlsplit(uri)
    b64 = base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
    assert parts.fragment == b64 and b64 not in parts.query
