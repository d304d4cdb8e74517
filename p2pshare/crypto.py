"""Every cryptographic operation p2pshare performs, as thin wrappers over libsodium and SPAKE2.

Nothing here is new cryptography: we compose reviewed primitives.

* Identity: Ed25519 (``nacl.signing``). A fingerprint is the first 120 bits of SHA-256 over the
  public key, in base32, grouped for reading aloud.
* PAKE: SPAKE2 over Ed25519 (the ``spake2`` package, as used by magic-wormhole). The receiver
  plays side A, the sender side B; both bind the fixed role labels below.
* Key derivation: keyed BLAKE2b (libsodium ``crypto_generichash`` with a personalisation string),
  which is how libsodium's own ``crypto_kdf`` works. Every derived key has an explicit purpose
  label, so no two uses ever share a key.
* Sealing: XChaCha20-Poly1305 IETF AEAD. Nonces are record counters (never random, never reused
  under one key, since every key is per connection and per direction). It is computed the way
  libsodium itself computes it — HChaCha20 (libsodium's ``crypto_core_hchacha20``, from the copy
  PyNaCl ships) turns key and the nonce's first 16 bytes into a subkey, then ChaCha20-Poly1305
  IETF seals under that subkey with the nonce's last 8 bytes — with the second step done by
  OpenSSL (pyca/cryptography), whose vectorised ChaCha20 and Poly1305 run about five times
  faster here than libsodium's. The bytes are identical to PyNaCl's
  ``crypto_aead_xchacha20poly1305_ietf_encrypt`` (the tests hold the two to that); where the
  HChaCha20 symbol or ``encrypt_into`` cannot be found, PyNaCl's whole AEAD is used instead.

nacl's, cryptography's and spake2's exceptions are translated to :class:`p2pshare.errors.CryptoError` here and
nowhere else.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nacl.bindings
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.signing
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib
from spake2 import SPAKE2_A, SPAKE2_B
from spake2.ed25519_basic import NotOnCurve
from spake2.spake2 import SPAKEError

from p2pshare.errors import ConfigError, CryptoError

KEY_BYTES = 32
NONCE_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
TAG_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

_SPAKE_ID_RECEIVER = b"p2pshare/1 receiver"
_SPAKE_ID_SENDER = b"p2pshare/1 sender"

Entropy = Callable[[int], bytes]


def derive(key: bytes, label: str, context: bytes = b"") -> bytes:
    """Derive a 32-byte subkey for one purpose.

    Args:
        key: 32-byte parent key.
        label: the purpose, at most 16 ASCII characters (BLAKE2b personalisation).
        context: public data the key is bound to (transcript hash, connection id).
    """
    person = label.encode("ascii")
    if len(person) > 16:
        raise ValueError(f"KDF label too long: {label!r}")
    return nacl.hash.blake2b(
        context,
        digest_size=KEY_BYTES,
        key=key,
        person=person.ljust(16, b"\0"),
        encoder=nacl.encoding.RawEncoder,
    )


def transcript_hash(*parts: bytes) -> bytes:
    """Hash a sequence of byte strings unambiguously (each one length-prefixed)."""
    h = hashlib.blake2b(digest_size=32, person=b"p2pshare-transcr")
    for part in parts:
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison."""
    return hmac.compare_digest(a, b)


def counter_nonce(counter: int) -> bytes:
    return counter.to_bytes(NONCE_BYTES, "little")


def _load_hchacha20() -> Callable[..., int] | None:
    """libsodium's ``crypto_core_hchacha20`` from the library PyNaCl loaded, if it exports it."""
    try:
        import nacl._sodium

        fn = ctypes.CDLL(nacl._sodium.__file__).crypto_core_hchacha20
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_hchacha20 = _load_hchacha20() if hasattr(ChaCha20Poly1305, "encrypt_into") else None

#: which implementation seals: "openssl" (HChaCha20 + OpenSSL ChaCha20-Poly1305) or "libsodium"
BACKEND = "openssl" if _hchacha20 is not None else "libsodium"

_IETF_NONCE_PAD = b"\0\0\0\0"


def _ietf(key: bytes, nonce: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    """The XChaCha20 nonce extension: (ChaCha20-Poly1305 under the subkey, its 12-byte nonce)."""
    assert _hchacha20 is not None
    if len(key) != KEY_BYTES:
        raise CryptoError("sealing needs a 32-byte key")
    subkey = ctypes.create_string_buffer(KEY_BYTES)
    if _hchacha20(subkey, nonce[:16], key, None) != 0:
        raise CryptoError("sealing failed")
    return ChaCha20Poly1305(subkey.raw), _IETF_NONCE_PAD + nonce[16:]


def seal(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext``; ``aad`` is authenticated but not sent."""
    return bytes(seal_after(b"", key, counter, plaintext, aad))


def seal_after(prefix: bytes, key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytearray:
    """``prefix + seal(key, counter, plaintext, aad)`` in one buffer, for the chunk hot path.

    The ciphertext is written straight behind the frame header: one allocation and no copy per
    chunk, where a high-level binding costs an allocation, a copy and a concatenation.
    """
    if len(key) != KEY_BYTES:
        raise CryptoError("sealing needs a 32-byte key")
    n = len(prefix)
    out = bytearray(n + len(plaintext) + TAG_BYTES)
    out[:n] = prefix
    if _hchacha20 is not None:
        aead, nonce = _ietf(key, counter_nonce(counter))
        aead.encrypt_into(nonce, plaintext, aad, memoryview(out)[n:])
        return out
    return _sodium_seal_into(out, n, key, counter, plaintext, aad)


def _sodium_seal_into(
    out: bytearray, n: int, key: bytes, counter: int, plaintext: bytes, aad: bytes
) -> bytearray:
    """PyNaCl's own XChaCha20-Poly1305 (the fallback, and the tests' reference)."""
    rc = _lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        _ffi.from_buffer(out) + n,
        _ffi.NULL,
        _ffi.from_buffer(plaintext),
        len(plaintext),
        aad,
        len(aad),
        _ffi.NULL,
        counter_nonce(counter),
        key,
    )
    if rc != 0:
        raise CryptoError("sealing failed")
    return out


def open_sealed(
    key: bytes, counter: int, ciphertext: bytes | bytearray | memoryview, aad: bytes
) -> bytearray:
    """Decrypt a sealed record. Raises CryptoError if anything was altered.

    Takes any buffer, so a frame can be opened where it lies in the receive buffer, and writes
    the plaintext without an extra copy.
    """
    clen = len(ciphertext)
    if clen < TAG_BYTES or len(key) != KEY_BYTES:
        raise CryptoError("a sealed record failed authentication")
    out = bytearray(clen - TAG_BYTES)
    if _hchacha20 is not None:
        aead, nonce = _ietf(key, counter_nonce(counter))
        try:
            aead.decrypt_into(nonce, ciphertext, aad, out)
        except InvalidTag:
            raise CryptoError("a sealed record failed authentication") from None
        return out
    return _sodium_open_into(out, key, counter, ciphertext, aad)


def _sodium_open_into(
    out: bytearray,
    key: bytes,
    counter: int,
    ciphertext: bytes | bytearray | memoryview,
    aad: bytes,
) -> bytearray:
    clen = len(ciphertext)
    rc = _lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        _ffi.from_buffer(out),
        _ffi.NULL,
        _ffi.NULL,
        _ffi.from_buffer(ciphertext),
        clen,
        aad,
        len(aad),
        counter_nonce(counter),
        key,
    )
    if rc != 0:
        raise CryptoError("a sealed record failed authentication")
    return out


def fingerprint(public_key: bytes) -> str:
    """A short, readable, stable name for an identity key: ``ABCD-EFGH-…`` (120 bits)."""
    digest = hashlib.sha256(b"p2pshare identity\0" + public_key).digest()[:15]
    text = base64.b32encode(digest).decode("ascii")
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Raise CryptoError unless ``signature`` is ``public_key``'s over ``message``."""
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError) as exc:
        raise CryptoError("a signature did not verify") from exc


@dataclass(frozen=True)
class Identity:
    """A node's long-term Ed25519 identity."""

    signing_key: nacl.signing.SigningKey

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    @classmethod
    def generate(cls, entropy: Entropy = os.urandom) -> Identity:
        return cls(nacl.signing.SigningKey(entropy(32)))

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """Load the node key, creating it (mode 0600) on first start."""
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise ConfigError(
                    f"the identity key {path} is readable by other users (mode {mode:o}); "
                    f"run: chmod 600 {path}"
                )
            seed = path.read_bytes()
            if len(seed) != 32:
                raise ConfigError(f"the identity key {path} is damaged (wrong length)")
            return cls(nacl.signing.SigningKey(seed))
        path.parent.mkdir(parents=True, exist_ok=True)
        identity = cls.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(bytes(identity.signing_key))
        return identity


class Pake:
    """One side of a SPAKE2 exchange over a shared password.

    Args:
        password: the offer secret (QR form) or the normalised spoken code.
        sender: True on the sending node (SPAKE2 side B), False on the receiver (side A).
        entropy: randomness source, injectable for known-answer tests.
    """

    def __init__(self, password: bytes, *, sender: bool, entropy: Entropy = os.urandom) -> None:
        cls = SPAKE2_B if sender else SPAKE2_A
        self._state = cls(password, idA=_SPAKE_ID_RECEIVER, idB=_SPAKE_ID_SENDER, entropy_f=entropy)
        self.message = self._state.start()

    def finish(self, peer_message: bytes) -> bytes:
        """Return the shared 32-byte key. A wrong password gives a different key, not an error."""
        try:
            return bytes(self._state.finish(peer_message))
        except (SPAKEError, NotOnCurve, ValueError, TypeError, AssertionError) as exc:
            raise CryptoError("the peer's key-exchange message is malformed") from exc
