"""Pure service-discovery rules: DNS answers to targets (gateway/core/discovery.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.core.config import DiscoveryConfig
from gateway.core.discovery import MAX_TARGETS, SrvRecord, best_srv, targets_from

DNS = DiscoveryConfig(kind="dns", name="users.test", port=8080, written="users.test:8080")


def test_addresses_become_sorted_deduplicated_targets() -> None:
    targets = targets_from(
        DNS, [("127.0.0.2", 8080, 1), ("127.0.0.1", 8080, 1), ("127.0.0.2", 8080, 3)]
    )
    assert [(t.url, t.weight) for t in targets] == [
        ("http://127.0.0.1:8080", 1),
        ("http://127.0.0.2:8080", 3),
    ]


def test_ipv6_addresses_are_bracketed_and_canonical() -> None:
    (target,) = targets_from(DNS, [("0:0:0:0:0:0:0:1", 8080, 1)])
    assert target.url == "http://[::1]:8080"


def test_non_loopback_addresses_are_kept_as_records() -> None:
    # Received, never connected to in these tests: a record is a record.
    (target,) = targets_from(DNS, [("10.1.2.3", 80, 1)])
    assert target.url == "http://10.1.2.3:80"


def test_addresses_that_cannot_be_targets_are_dropped() -> None:
    hostile = [
        ("0.0.0.0", 80, 1),
        ("::", 80, 1),
        ("224.0.0.1", 80, 1),
        ("ff02::1", 80, 1),
        ("255.255.255.255", 80, 1),
        ("not an address", 80, 1),
        ("127.0.0.1\r\nHost: x", 80, 1),
        ("127.0.0.1", 0, 1),
        ("127.0.0.1", 70000, 1),
    ]
    assert targets_from(DNS, hostile) == ()


def test_a_zero_weight_counts_as_one() -> None:
    (target,) = targets_from(DNS, [("127.0.0.1", 80, 0)])
    assert target.weight == 1


@given(st.lists(st.integers(0, 2**32 - 1), max_size=2000))
def test_never_more_than_max_targets(addresses: list[int]) -> None:
    import ipaddress

    triples = [(str(ipaddress.IPv4Address(a)), 80, 1) for a in addresses]
    assert len(targets_from(DNS, triples)) <= MAX_TARGETS


def test_srv_keeps_the_lowest_priority_and_drops_unusable_records() -> None:
    records = [
        SrvRecord(20, 1, 80, "backup.test"),
        SrvRecord(10, 5, 81, "b.test."),
        SrvRecord(10, 1, 82, "a.test"),
        SrvRecord(5, 1, 80, "."),  # no service
        SrvRecord(5, 1, 0, "zero.test"),  # port 0
        SrvRecord(5, 1, 80, "bad name.test"),
        SrvRecord(5, 1, 80, "x" * 64 + ".test"),
        SrvRecord(5, 70000, 80, "w.test"),
    ]
    assert best_srv(records) == [SrvRecord(10, 1, 82, "a.test"), SrvRecord(10, 5, 81, "b.test.")]
    assert best_srv([SrvRecord(0, 0, 80, ".")]) == []
