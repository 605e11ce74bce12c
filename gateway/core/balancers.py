"""Load balancers: which available target gets the next request.

Every balancer answers `pick(candidates, client)`. `candidates` is the part of
the pool that may take a request right now (breaker admits it, healthy, not
already tried by this request), in stable config order, so the balancers never
look at health or breakers themselves. They return None for an empty sequence
and otherwise always a member of `candidates`.

State that must outlive one call (counters, smooth weights) lives in the
balancer and is keyed by target URL, never by position, because the candidate
set changes from one request to the next as targets fail and recover.

All of it is pure and allocation-light: one pass (two for least connections)
over the candidates, no sorting, no random module (see proxy.py's "Not like"
in STYLE.md: `random.choice` is not load balancing).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

__all__ = [
    "Balancer",
    "BalancerName",
    "IpHash",
    "LeastConnections",
    "Pickable",
    "RoundRobin",
    "SmoothWeighted",
    "make_balancer",
]

BalancerName = Literal["round_robin", "weighted", "least_connections", "ip_hash"]


class Pickable(Protocol):
    """What a balancer needs to know about a target (upstream.Target has more)."""

    @property
    def url(self) -> str: ...

    @property
    def weight(self) -> int: ...

    @property
    def in_flight(self) -> int: ...


T = TypeVar("T", bound=Pickable)


class Balancer(Protocol[T]):
    def pick(self, candidates: Sequence[T], client: str) -> T | None: ...


class RoundRobin(Generic[T]):
    """Each candidate in turn, ignoring weights.

    The cursor is kept modulo the current number of candidates, so it stays a
    small int forever; with a stable candidate set every target gets a turn
    every `len(candidates)` picks.
    """

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[T], client: str) -> T | None:
        n = len(candidates)
        if n == 0:
            return None
        i = self._next % n
        self._next = i + 1
        return candidates[i]


class SmoothWeighted(Generic[T]):
    """nginx's smooth weighted round robin (ngx_http_upstream_get_peer).

    On every pick each candidate's current weight grows by its weight, the
    largest current weight wins (first in config order on a tie, as nginx's
    strict `>`), and the winner gives back the total. Over any `sum(weights)`
    consecutive picks of a stable candidate set each target is chosen exactly
    `weight` times, and heavy targets are interleaved with light ones
    (5,1,1 -> a a b a c a a), not bunched (a a a a a b c).

    Current weights are kept per URL so that a target leaving the candidate set
    (breaker open, already tried) keeps its place in the cycle when it returns,
    as nginx keeps `peer->current_weight` for down peers.
    """

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, candidates: Sequence[T], client: str) -> T | None:
        current = self._current
        best: T | None = None
        best_weight = 0
        total = 0
        for target in candidates:
            weight = _positive(target.weight)
            url = target.url
            cw = current.get(url, 0) + weight
            current[url] = cw
            total += weight
            if best is None or cw > best_weight:
                best = target
                best_weight = cw
        if best is not None:
            current[best.url] = best_weight - total
        return best


class LeastConnections(Generic[T]):
    """The candidate with the fewest requests in flight per unit of weight.

    Loads are compared by cross-multiplying (a.in_flight * b.weight against
    b.in_flight * a.weight), exact in ints, so no float division per target.
    Ties go round robin among the tied: with every target idle, a plain "first
    minimum" would send every request that arrives between two completions to
    the first target in the list.
    """

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[T], client: str) -> T | None:
        # Pass 1: the minimum load and how many targets share it.
        best_load = 0
        best_weight = 0
        ties = 0
        for target in candidates:
            load = target.in_flight
            weight = _positive(target.weight)
            if ties == 0:
                best_load, best_weight, ties = load, weight, 1
                continue
            lhs = load * best_weight
            rhs = best_load * weight
            if lhs < rhs:
                best_load, best_weight, ties = load, weight, 1
            elif lhs == rhs:
                ties += 1
        if ties == 0:
            return None
        # Pass 2: the k-th of the tied, k turning round robin. Two passes instead
        # of collecting the tied into a list: nothing is allocated per request.
        k = self._next % ties
        self._next = k + 1
        for target in candidates:
            if target.in_flight * best_weight == best_load * _positive(target.weight):
                if k == 0:
                    return target
                k -= 1
        raise AssertionError("unreachable: candidates changed during pick")


# 52 random bits map to u = (bits + 0.5) / 2**52, strictly inside (0, 1) and
# exact in a double (53-bit mantissa), so log(u) is finite and never 0.
_HASH_SHIFT: Final = 64 - 52
_HASH_SCALE: Final = 1.0 / float(1 << 52)


class IpHash(Generic[T]):
    """Weighted rendezvous (highest random weight) hashing on the client address.

    Every (client, target URL) pair gets a pseudo-random u in (0, 1) from a
    64-bit BLAKE2b digest, stable across processes and restarts (Python's
    `hash()` is salted per process). The target with the highest
    `-weight / ln(u)` wins, which picks target i with probability
    `weight_i / sum(weights)` (Schindelhauer & Schomaker, "Weighted Distributed
    Hash Tables", 2005). Removing a target only moves the clients it had: every
    other pair keeps its score, so the maximum over the rest is unchanged.
    """

    __slots__ = ()

    def pick(self, candidates: Sequence[T], client: str) -> T | None:
        if not candidates:
            return None
        # Hash the client once; each target costs a cheap copy() and update().
        # The NUL separator keeps ("1.2.3.4", "5x") and ("1.2.3.45", "x") apart.
        seed = hashlib.blake2b(client.encode() + b"\0", digest_size=8)
        best = candidates[0]
        best_score = -1.0
        for target in candidates:
            h = seed.copy()
            h.update(target.url.encode())
            bits = int.from_bytes(h.digest(), "big") >> _HASH_SHIFT
            u = (bits + 0.5) * _HASH_SCALE
            score = _positive(target.weight) / -math.log(u)
            if score > best_score:
                best = target
                best_score = score
        return best


def _positive(weight: int) -> int:
    # config.py refuses weights below 1; clamping here keeps a stray 0 from
    # dividing by zero or starving a target on the request path.
    return weight if weight > 0 else 1


def make_balancer(name: BalancerName) -> Balancer[Any]:
    """A fresh balancer for an upstream's `balancer = "..."` setting."""
    if name == "round_robin":
        return RoundRobin()
    if name == "weighted":
        return SmoothWeighted()
    if name == "least_connections":
        return LeastConnections()
    if name == "ip_hash":
        return IpHash()
    raise ValueError(f"unknown balancer {name!r}")
