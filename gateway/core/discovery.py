"""Service discovery rules: DNS answers in, targets out. Pure (no lookups here).

A `{ dns = "host:port" }` target is every A/AAAA address of `host` on `port`;
a `{ srv = "_http._tcp.name" }` target is every address of every host of the
SRV records of the best (lowest) priority, with the record's port and weight
(RFC 2782: higher priorities are backups, used only when the lower ones are
gone). DNS answers are input from the network: every value is checked, and
what cannot be a target is dropped, never connected to.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from gateway.core.config import DiscoveryConfig, TargetConfig

__all__ = ["MAX_TARGETS", "SrvRecord", "best_srv", "targets_from"]

# The most targets one dns/srv entry may become: a hostile or broken zone
# answering thousands of records must not make thousands of pools and probes.
MAX_TARGETS: Final = 256
# SRV weights are 0-65535 (RFC 2782); the balancers take them as they are,
# with 0 ("very small chance") as 1.
_MAX_SRV_WEIGHT: Final = 65535


@dataclass(frozen=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    host: str


def usable_address(address: str) -> str | None:
    """`address` in canonical text if a target may be sent to it, else None.

    Unspecified (0.0.0.0, ::) and multicast addresses are never targets
    (connecting to 0.0.0.0 reaches the local host on Linux: a record must not
    turn the gateway onto itself by accident), nor is the IPv4 broadcast address.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.is_unspecified or ip.is_multicast:
        return None
    if ip.version == 4 and int(ip) == 0xFFFFFFFF:
        return None
    return ip.compressed


def target_url(scheme: str, address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}"


def best_srv(records: Iterable[SrvRecord]) -> list[SrvRecord]:
    """The usable SRV records of the lowest priority, in a stable order.

    A target of "." means "no service here" (RFC 2782); port 0 cannot be
    connected to; a host that is no DNS name is dropped.
    """
    usable = [
        r
        for r in records
        if 0 < r.port <= 65535
        and 0 <= r.weight <= _MAX_SRV_WEIGHT
        and r.host not in ("", ".")
        and _is_dns_name(r.host)
    ]
    if not usable:
        return []
    best = min(r.priority for r in usable)
    return sorted((r for r in usable if r.priority == best), key=lambda r: (r.host, r.port))


def targets_from(
    found: DiscoveryConfig, addresses: Iterable[tuple[str, int, int]]
) -> tuple[TargetConfig, ...]:
    """Targets for (address, port, weight) triples: usable ones only,
    deduplicated (the highest weight wins), sorted, at most MAX_TARGETS."""
    weights: dict[str, int] = {}
    for address, port, weight in addresses:
        ip = usable_address(address)
        if ip is None or not 0 < port <= 65535:
            continue
        url = target_url(found.scheme, ip, port)
        weights[url] = max(weights.get(url, 0), max(1, weight))
    urls = sorted(weights)[:MAX_TARGETS]
    return tuple(TargetConfig(url=url, weight=weights[url]) for url in urls)


def _is_dns_name(name: str) -> bool:
    bare = name.removesuffix(".")
    if not bare or len(bare) > 253 or not bare.isascii():
        return False
    for label in bare.split("."):
        if not 0 < len(label) <= 63:
            return False
        if not all(ch.isalnum() or ch in "-_" for ch in label):
            return False
    return True
