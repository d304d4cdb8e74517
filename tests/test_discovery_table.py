"""The table of LAN nodes cannot be crowded out by fake adverts (pure table logic, no multicast)."""

from __future__ import annotations

from p2pshare.discovery import Discovered, Discovery

PINNED = "QJVF-MIEA-EYFP-EQXA-UORK-XUYP"


def fp(n: int) -> str:
    return f"FAKE-{n:04d}"


def table(now: list[float], **kw: int) -> Discovery:
    return Discovery("me", "ME", "127.0.0.1", pinned=lambda: {PINNED}, clock=lambda: now[0], **kw)


def peer(n: int, host: str, now: float, fingerprint: str | None = None) -> Discovered:
    return Discovered(f"node {n}", fingerprint or fp(n), (host,), 8700, now)


def test_entries_not_refreshed_expire() -> None:
    now = [1000.0]
    d = table(now)
    assert d.admit("a", peer(1, "10.0.0.1", now[0]))
    now[0] += d.expire_s - 1
    assert d.admit("b", peer(2, "10.0.0.2", now[0]))
    assert [p.name for p in d.peers()] == ["node 1", "node 2"]
    now[0] += 2  # "a" was last confirmed expire_s + 1 ago
    assert [p.name for p in d.peers()] == ["node 2"]
    assert d.admit("b", peer(2, "10.0.0.2", now[0]))  # refreshed: stays
    now[0] += d.expire_s - 1
    assert [p.name for p in d.peers()] == ["node 2"]


def test_a_full_table_keeps_room_for_pinned_institutions() -> None:
    now = [0.0]
    d = table(now, max_peers=4, max_per_host=100)
    for i in range(4):
        now[0] += 1
        assert d.admit(f"fake{i}", peer(i, f"10.9.0.{i}", now[0]))
    assert not d.admit("another-fake", peer(9, "10.9.0.9", now[0]))
    assert d.admit("real", peer(5, "10.1.0.5", now[0], PINNED))
    names = {p.name for p in d.peers()}
    assert "node 5" in names and "node 0" not in names and len(names) == 4  # stalest fake went


def test_one_address_cannot_fill_the_table() -> None:
    now = [0.0]
    d = table(now, max_peers=256, max_per_host=3)
    for i in range(3):
        assert d.admit(f"fake{i}", peer(i, "10.6.6.6", now[0]))
    assert not d.admit("fake3", peer(3, "10.6.6.6", now[0]))
    assert d.admit("other", peer(4, "10.0.0.4", now[0]))  # another address is not affected
    assert d.admit("pinned", peer(5, "10.6.6.6", now[0], PINNED))  # pinned displaces a fake
    assert len([p for p in d.peers() if "10.6.6.6" in p.hosts]) == 3
