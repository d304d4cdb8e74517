"""Units of the network piece: TXT parsing, route planning, relay addresses in QR links, rate."""

from __future__ import annotations

import pytest

from p2pshare import codes
from p2pshare.discovery import Discovered, parse_txt
from p2pshare.errors import ConfigError
from p2pshare.relay import RateLimit
from p2pshare.transfer import paths
from p2pshare.transfer.relay_client import normalise, rendezvous_token

FP = "QJVF-MIEA-EYFP-EQXA-UORK-XUYP"


def test_txt_record_is_checked_like_hostile_input() -> None:
    good = {b"name": b"Mercy ED", b"fp": FP.encode(), b"v": b"1", b"port": b"8700"}
    assert parse_txt(good) == ("Mercy ED", FP, 8700)
    assert parse_txt({**good, b"v": b"2"}) is None
    assert parse_txt({**good, b"fp": b"not-a-fingerprint"}) is None
    assert parse_txt({**good, b"port": b"70000"}) is None
    assert parse_txt({**good, b"name": b"\x1b[31mevil"}) is None
    assert parse_txt({b"name": b"x"}) is None


def test_plan_merges_given_qr_lan_and_relay_routes() -> None:
    qr = codes.QrOffer("a" * 32, b"s" * 32, "Mercy", FP, 0, ("10.0.0.1:8700", "relay:r.example:8790"))
    lan = [Discovered("Mercy", FP, ("10.0.0.1", "10.0.0.2"), 8700, 0.0)]
    other = [Discovered("Other", "AAAA-AAAA-AAAA-AAAA-AAAA-AAAA", ("10.0.0.9",), 8700, 0.0)]
    routes = paths.plan(codes.parse_qr_uri(qr.uri()), [], [], lan + other)
    assert [(r.kind, r.address) for r in routes] == [
        ("direct", "10.0.0.1:8700"),
        ("relay", "r.example:8790"),
        ("lan", "10.0.0.2:8700"),  # same fingerprint as the QR code; the other node is not tried
    ]
    spoken = codes.parse_spoken("7-glisten-ivory-sardine-utility")
    assert paths.plan(spoken, [], [], lan) == []  # the caller asks the whole LAN
    assert [r.kind for r in paths.plan(spoken, ["Mercy"], [], lan)] == ["lan", "lan"]
    with pytest.raises(ConfigError, match="neither host:port"):
        paths.plan(spoken, ["Nobody"], [], lan)


def test_relay_address_in_qr_link_round_trips_and_old_form_still_parses() -> None:
    qr = codes.QrOffer("b" * 32, b"s" * 32, "X", FP, 5, ("127.0.0.1:1", "relay:127.0.0.1:9"))
    assert codes.parse_qr_uri(qr.uri()).addresses == qr.addresses
    bad = codes.QrOffer("b" * 32, b"s" * 32, "X", FP, 5, ("relay:", "relay:a:b:c", "x"))
    assert codes.parse_qr_uri(bad.uri()).addresses == ()


def test_rendezvous_token_depends_on_secret_and_offer() -> None:
    t = rendezvous_token("c" * 32, b"k" * 32)
    assert len(t) == 64 and t == rendezvous_token("c" * 32, b"k" * 32)
    assert t != rendezvous_token("d" * 32, b"k" * 32)
    assert t != rendezvous_token("c" * 32, b"j" * 32)
    assert normalise("ws://relay.example:8790/") == "relay.example:8790"
    with pytest.raises(ConfigError):
        normalise("http://x")


def test_rate_limit_per_address_window() -> None:
    now = [0.0]
    rate = RateLimit(2, clock=lambda: now[0])
    assert rate.allow("a") and rate.allow("a") and not rate.allow("a")
    assert rate.allow("b")
    now[0] = 61.0
    assert rate.allow("a")
