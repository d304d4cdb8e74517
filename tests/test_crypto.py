"""Known answers for every primitive p2pshare composes, and their failure modes.

The hex constants below were computed once, by hand, straight from libsodium (PyNaCl's
``nacl.bindings``), ``hashlib.blake2b`` and the ``spake2`` package, not through
``p2pshare.crypto``. A change of nonce construction, AAD handling, KDF label or role label
therefore breaks them; that is the point (the wire format is fixed by ``docs/protocol.md``).
"""

from __future__ import annotations

import hashlib
import os
import random
import stat

import nacl.bindings
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pshare import crypto
from p2pshare.errors import ConfigError, CryptoError

KEY = bytes(range(32))

# nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(b"hello", b"x",
#     (5).to_bytes(24, "little"), bytes(range(32)))
SEAL_HELLO_5_X = "8509564f94de5ce88074a4766934aa1deb540e0888"
# same, empty plaintext, empty AAD, counter 0: the bare Poly1305 tag
SEAL_EMPTY_0 = "c37cd9ed462925e24ca30f972ce1a931"
# counter 2**64 + 1: the counter fills more than 8 bytes of the nonce, little endian
SEAL_HELLO_BIG_X = "8a3b3d329d43f8f82c1e30d4f3aa84c48394ba9d47"
# hashlib.blake2b(b"ctx", digest_size=32, key=bytes(range(32)),
#     person=b"p2ps session".ljust(16, b"\0"))
DERIVE_SESSION_CTX = "348daefe13ad13cd1ff5461bd158ab5fe1feb0b2887e6c2ad2659752dfbb282a"
DERIVE_TRANSFER_EMPTY = "7b32bd641a18f7f0518790f6b891b739852d51c655a01cdb45aeb4d04934e226"
# bytes(nacl.signing.SigningKey(bytes(range(32))).verify_key)
PK = bytes.fromhex("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")
# base32(sha256(b"p2pshare identity\0" + PK)[:15]) in groups of four
FINGERPRINT = "SOZ4-5RVN-PDIR-3PV5-WP76-ZXZT"
# SigningKey(bytes(range(32))).sign(b"p2pshare test").signature (Ed25519 is deterministic)
SIG = (
    "4ad293afcb1c2554441794db53e49c094b0e3534a848ae2858763618f5ff8cfe"
    "ca40c4ff0d899a9d33b41639b489891e77e625eb1fe5dd59ac53d0c01bd0f20f"
)
# blake2b(person=b"p2pshare-transcr") over u32be(len) | part for parts b"a", b"bc", b""
TRANSCRIPT_A_BC_EMPTY = "baae41d027206ec0f586aad1b9b13d48f6bac7f49d481e6505a06bf24c2c1461"
# spake2.SPAKE2_A / SPAKE2_B(b"p2pshare qr:" + b"k" * 32, idA=b"p2pshare/1 receiver",
#     idB=b"p2pshare/1 sender", entropy_f=random.Random(1 | 2).randbytes)
PAKE_PASSWORD = b"p2pshare qr:" + b"k" * 32
PAKE_MSG_RECEIVER = "41a9aaa23dbc74ac0541bfc63cfc2e3fa936da7a3abde611b5d6b9f7b875842650"
PAKE_MSG_SENDER = "4242ea7a0e8f4b210813a2fb9541e19ec796f9c8395d57aa76552158cf541c8a26"
PAKE_KEY = "b28785e1640d11b086827979e9a15879d0465f5481efec3d8ee571da610c087b"


def seeded(seed: int):
    rng = random.Random(seed)
    return rng.randbytes


# -- sealing ----------------------------------------------------------------------------------------


@pytest.fixture(params=["openssl", "libsodium"])
def backend(request, monkeypatch):
    """Run a sealing test with each implementation: they must be indistinguishable."""
    if request.param == "libsodium":
        monkeypatch.setattr(crypto, "_hchacha20", None)
    return request.param


def test_the_fast_implementation_is_the_one_in_use():
    # cryptography >= 47 (encrypt_into) and PyNaCl's libsodium (crypto_core_hchacha20) are both
    # dependencies: if either went missing, sealing would silently run at a fifth of the speed.
    assert crypto.BACKEND == "openssl"


@settings(max_examples=200, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32),
    counter=st.integers(min_value=0, max_value=2**128 - 1),
    plaintext=st.binary(max_size=3000),
    aad=st.binary(max_size=80),
)
def test_openssl_sealing_is_byte_for_byte_pynacls_xchacha20poly1305(key, counter, plaintext, aad):
    nonce = crypto.counter_nonce(counter)
    ours = crypto.seal(key, counter, plaintext, aad)
    theirs = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)
    assert ours == theirs
    assert crypto.open_sealed(key, counter, theirs, aad) == plaintext
    assert nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ours, aad, nonce, key) == (
        plaintext
    )


def test_seal_after_puts_the_record_behind_the_prefix(backend):
    framed = crypto.seal_after(b"HEAD", KEY, 5, b"hello", b"x")
    assert bytes(framed) == b"HEAD" + bytes.fromhex(SEAL_HELLO_5_X)
    assert crypto.open_sealed(KEY, 5, memoryview(framed)[4:], b"x") == b"hello"


def test_seal_known_answer(backend):
    assert crypto.seal(KEY, 5, b"hello", b"x").hex() == SEAL_HELLO_5_X
    assert crypto.seal(KEY, 0, b"", b"").hex() == SEAL_EMPTY_0
    assert crypto.seal(KEY, 2**64 + 1, b"hello", b"x").hex() == SEAL_HELLO_BIG_X


def test_counter_nonce_is_the_counter_little_endian_in_24_bytes():
    assert crypto.NONCE_BYTES == 24 and crypto.TAG_BYTES == 16
    assert crypto.counter_nonce(0) == bytes(24)
    assert crypto.counter_nonce(5) == b"\x05" + bytes(23)
    assert crypto.counter_nonce(0x0102) == b"\x02\x01" + bytes(22)
    assert crypto.counter_nonce(2**64 + 1) == b"\x01" + bytes(7) + b"\x01" + bytes(15)
    with pytest.raises(OverflowError):
        crypto.counter_nonce(2**192)


def test_seal_open_round_trip_and_overhead(backend):
    ct = crypto.seal(KEY, 7, b"pixel data" * 100, b"aad")
    assert len(ct) == 1000 + crypto.TAG_BYTES
    assert crypto.open_sealed(KEY, 7, ct, b"aad") == b"pixel data" * 100
    assert crypto.open_sealed(KEY, 5, bytes.fromhex(SEAL_HELLO_5_X), b"x") == b"hello"


@pytest.mark.parametrize("pos", [0, 2, 4, 5, 20])
def test_open_refuses_a_flipped_bit_anywhere(pos, backend):
    ct = bytearray.fromhex(SEAL_HELLO_5_X)
    ct[pos] ^= 0x01
    with pytest.raises(CryptoError):
        crypto.open_sealed(KEY, 5, bytes(ct), b"x")


@pytest.mark.parametrize(
    "key, counter, aad",
    [
        (KEY, 4, b"x"),  # replayed / reordered: another counter
        (KEY, 6, b"x"),
        (KEY, 5, b"y"),  # another frame type / transfer / position in the AAD
        (KEY, 5, b""),
        (KEY, 5, b"xx"),
        (bytes(32), 5, b"x"),  # another connection's key
    ],
)
def test_open_refuses_wrong_counter_aad_or_key(key, counter, aad, backend):
    with pytest.raises(CryptoError):
        crypto.open_sealed(key, counter, bytes.fromhex(SEAL_HELLO_5_X), aad)


@pytest.mark.parametrize("n", [0, 1, 15])
def test_open_refuses_records_shorter_than_a_tag(n, backend):
    with pytest.raises(CryptoError):
        crypto.open_sealed(KEY, 0, bytes(n), b"")


def test_open_refuses_a_truncated_record(backend):
    ct = bytes.fromhex(SEAL_HELLO_5_X)
    with pytest.raises(CryptoError):
        crypto.open_sealed(KEY, 5, ct[:-1], b"x")
    with pytest.raises(CryptoError):
        crypto.open_sealed(KEY, 5, ct[1:], b"x")


# -- key derivation and transcripts -----------------------------------------------------------------


def test_derive_known_answer():
    assert crypto.derive(KEY, "p2ps session", b"ctx").hex() == DERIVE_SESSION_CTX
    assert crypto.derive(KEY, "p2ps transfer").hex() == DERIVE_TRANSFER_EMPTY
    # and it is exactly keyed BLAKE2b with the label as personalisation
    assert (
        crypto.derive(KEY, "p2ps hs r2s", b"t0")
        == hashlib.blake2b(
            b"t0", digest_size=32, key=KEY, person=b"p2ps hs r2s".ljust(16, b"\0")
        ).digest()
    )


def test_derive_separates_labels_contexts_and_keys():
    base = crypto.derive(KEY, "p2ps data s2r", b"c")
    assert crypto.derive(KEY, "p2ps data r2s", b"c") != base
    assert crypto.derive(KEY, "p2ps data s2r", b"d") != base
    assert crypto.derive(bytes(32), "p2ps data s2r", b"c") != base
    assert len(base) == crypto.KEY_BYTES


def test_derive_refuses_labels_longer_than_16_bytes():
    crypto.derive(KEY, "x" * 16)
    with pytest.raises(ValueError):
        crypto.derive(KEY, "x" * 17)


def test_transcript_hash_known_answer_and_is_unambiguous():
    assert crypto.transcript_hash(b"a", b"bc", b"").hex() == TRANSCRIPT_A_BC_EMPTY
    # length prefixes: moving a byte between parts, or adding an empty part, changes the hash
    assert crypto.transcript_hash(b"ab", b"c") != crypto.transcript_hash(b"a", b"bc")
    assert crypto.transcript_hash(b"a", b"bc") != crypto.transcript_hash(b"a", b"bc", b"")


def test_equal_is_a_plain_comparison():
    assert crypto.equal(b"abc", b"abc")
    assert not crypto.equal(b"abc", b"abd")
    assert not crypto.equal(b"abc", b"ab")


# -- identities, fingerprints, signatures -----------------------------------------------------------


def test_identity_and_fingerprint_known_answer():
    ident = crypto.Identity.generate(lambda n: bytes(range(n)))
    assert ident.public_key == PK
    assert ident.fingerprint == FINGERPRINT == crypto.fingerprint(PK)
    # 120 bits: 24 base32 characters in six groups of four
    assert len(FINGERPRINT.replace("-", "")) * 5 == 120


def test_signature_known_answer_verifies_and_a_wrong_one_raises():
    ident = crypto.Identity.generate(lambda n: bytes(range(n)))
    sig = ident.sign(b"p2pshare test")
    assert sig.hex() == SIG
    crypto.verify_signature(PK, b"p2pshare test", sig)
    with pytest.raises(CryptoError):
        crypto.verify_signature(PK, b"p2pshare test!", sig)
    bad = bytearray(sig)
    bad[10] ^= 0x20
    with pytest.raises(CryptoError):
        crypto.verify_signature(PK, b"p2pshare test", bytes(bad))
    other = crypto.Identity.generate(seeded(3))
    with pytest.raises(CryptoError):
        crypto.verify_signature(other.public_key, b"p2pshare test", sig)
    with pytest.raises(CryptoError):
        crypto.verify_signature(PK, b"p2pshare test", other.sign(b"p2pshare test"))


@pytest.mark.parametrize(
    "pk, sig",
    [(PK[:31], bytes.fromhex(SIG)), (PK, bytes.fromhex(SIG)[:63]), (PK, b""), (b"", b"")],
)
def test_malformed_keys_and_signatures_raise_crypto_error(pk, sig):
    with pytest.raises(CryptoError):
        crypto.verify_signature(pk, b"p2pshare test", sig)


def test_load_or_create_writes_a_0600_key_and_loads_it_back(tmp_path):
    path = tmp_path / "deep" / "node.key"
    first = crypto.Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == bytes(first.signing_key)
    assert len(path.read_bytes()) == 32
    again = crypto.Identity.load_or_create(path)
    assert again.public_key == first.public_key


def test_load_or_create_keeps_0600_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        path = tmp_path / "node.key"
        crypto.Identity.load_or_create(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666])
def test_load_or_create_refuses_a_key_others_can_read(tmp_path, mode):
    path = tmp_path / "node.key"
    crypto.Identity.load_or_create(path)
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        crypto.Identity.load_or_create(path)
    assert "chmod 600" in str(info.value)
    assert str(path) in str(info.value)


def test_load_or_create_refuses_a_damaged_key(tmp_path):
    path = tmp_path / "node.key"
    path.write_bytes(b"short")
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        crypto.Identity.load_or_create(path)
    assert "damaged" in str(info.value)


# -- SPAKE2 -----------------------------------------------------------------------------------------


def test_pake_known_answer_with_injected_entropy():
    r = crypto.Pake(PAKE_PASSWORD, sender=False, entropy=seeded(1))
    s = crypto.Pake(PAKE_PASSWORD, sender=True, entropy=seeded(2))
    assert r.message.hex() == PAKE_MSG_RECEIVER
    assert s.message.hex() == PAKE_MSG_SENDER
    assert r.finish(s.message).hex() == PAKE_KEY
    assert s.finish(r.message).hex() == PAKE_KEY


def test_pake_same_password_agrees_different_password_does_not():
    r = crypto.Pake(b"pw-one", sender=False, entropy=seeded(10))
    s = crypto.Pake(b"pw-one", sender=True, entropy=seeded(11))
    assert r.finish(s.message) == s.finish(r.message)

    r = crypto.Pake(b"pw-one", sender=False, entropy=seeded(10))
    s = crypto.Pake(b"pw-two", sender=True, entropy=seeded(11))
    k_r, k_s = r.finish(s.message), s.finish(r.message)
    assert len(k_r) == len(k_s) == 32
    assert k_r != k_s  # a wrong password is not an error here: the keys just differ


def test_pake_fresh_entropy_gives_fresh_keys():
    keys = set()
    for seed in range(3):
        r = crypto.Pake(PAKE_PASSWORD, sender=False, entropy=seeded(100 + seed))
        s = crypto.Pake(PAKE_PASSWORD, sender=True, entropy=seeded(200 + seed))
        keys.add(r.finish(s.message))
    assert len(keys) == 3


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"B" + bytes(31),  # short
        b"B" + bytes(33),  # long
        b"A" + bytes.fromhex(PAKE_MSG_SENDER)[1:],  # a message from the wrong side
        b"x" + bytes.fromhex(PAKE_MSG_SENDER)[1:],  # no side at all
        b"B" + b"\xff" * 32,  # not a field element
        b"B" + bytes(range(1, 33)),  # not on the curve
        b"B" + bytes(32),
    ],
    ids=["empty", "short", "long", "wrong-side", "no-side", "not-field", "off-curve", "zero"],
)
def test_pake_malformed_message_raises_crypto_error(message):
    r = crypto.Pake(PAKE_PASSWORD, sender=False, entropy=seeded(1))
    with pytest.raises(CryptoError):
        r.finish(message)


def test_pake_reflection_is_refused():
    r = crypto.Pake(PAKE_PASSWORD, sender=False, entropy=seeded(1))
    with pytest.raises(CryptoError):
        r.finish(r.message)
