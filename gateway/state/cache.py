"""The shared in-memory response store, sized in bytes (cachetools' LRUCache).

One `ResponseCache` per gateway process, kept across reloads while `[cache]`
does not change. Keys are per URL: (route, scheme, host, raw path and
query); under one key live the variants of that URL (one per consumer and
set of `Vary`-nominated request values), weighed together in the LRU, so
an unsafe method or a purge drops them all at once.

Memory: what is stored never exceeds `max_bytes` (least recently used URLs
go first); a fill in progress holds at most `max_entry_bytes` more (a body
that grows past it is dropped and keeps streaming to its client unstored).

`fills` maps a key being fetched to its `Fill`: concurrent misses wait on
it (collapsed forwarding, like nginx's proxy_cache_lock) instead of each
going upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from cachetools import LRUCache

# (route, scheme, host, raw path with query)
Key = tuple[str, str, str, str]
# (consumer or "", ((field, normalised request value), ...))
VariantKey = tuple[str, tuple[tuple[str, str], ...]]

# Variants kept per URL: a client cannot grow one key's list without bound by
# spraying values of a Vary-nominated header (the oldest variant goes first).
MAX_VARIANTS: Final = 32
# What an entry costs beyond its head and body bytes (objects, dict slots).
ENTRY_OVERHEAD: Final = 256


class Entry:
    """One stored response. Immutable once stored: a refresh stores a new one."""

    __slots__ = (
        "body",
        "consumer",
        "etag",
        "headers",
        "initial_age",
        "last_modified",
        "lifetime",
        "may_stale",
        "reason",
        "size",
        "stale_if_error",
        "status",
        "stored_at",
        "vary",
    )

    def __init__(
        self,
        *,
        status: int,
        reason: str,
        headers: tuple[tuple[str, str], ...],
        body: bytes,
        vary: tuple[tuple[str, str], ...],
        consumer: str,
        lifetime: float,
        initial_age: float,
        stored_at: float,
        stale_if_error: float,
        may_stale: bool,
        etag: str | None,
        last_modified: str | None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.vary = vary
        self.consumer = consumer
        self.lifetime = lifetime
        self.initial_age = initial_age
        self.stored_at = stored_at
        self.stale_if_error = stale_if_error
        self.may_stale = may_stale
        self.etag = etag
        self.last_modified = last_modified
        self.size = (
            len(body)
            + sum(len(name) + len(value) + 4 for name, value in headers)
            + sum(len(name) + len(value) for name, value in vary)
            + ENTRY_OVERHEAD
        )

    @property
    def variant(self) -> VariantKey:
        return (self.consumer, self.vary)

    def age(self, now: float) -> float:
        """RFC 9111 4.2.3 current_age: the initial age plus the time held here."""
        return self.initial_age + max(0.0, now - self.stored_at)

    def matches(self, consumer: str, values: Callable[[str], str]) -> bool:
        """RFC 9111 4.1: the request's nominated fields equal the stored ones."""
        if self.consumer != consumer:
            return False
        return all(values(name) == value for name, value in self.vary)


class Variants:
    """The stored responses of one URL; weighed as one item in the LRU."""

    __slots__ = ("entries", "size")

    def __init__(self) -> None:
        self.entries: dict[VariantKey, Entry] = {}
        self.size = 0

    def add(self, entry: Entry) -> None:
        old = self.entries.pop(entry.variant, None)
        if old is not None:
            self.size -= old.size
        while len(self.entries) >= MAX_VARIANTS:
            oldest = next(iter(self.entries))
            self.size -= self.entries.pop(oldest).size
        self.entries[entry.variant] = entry
        self.size += entry.size


def _weight(variants: Variants) -> int:
    return variants.size


class Fill:
    """One upstream request that concurrent misses for the same key wait on.

    `done` is set as soon as the outcome is known: stored (`stored` True),
    or not storable / failed (the waiters then go upstream on their own).
    """

    __slots__ = ("done", "stored")

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.stored = False

    def end(self, stored: bool) -> None:
        if not self.done.is_set():
            self.stored = stored
            self.done.set()


class ResponseCache:
    def __init__(self, max_bytes: int, max_entry_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self._lru: LRUCache[Key, Variants] = LRUCache(maxsize=max_bytes, getsizeof=_weight)
        self.fills: dict[tuple[Key, str], Fill] = {}
        # Bumped when a route's entries are purged (reload, admin): a fill
        # that began before must not store what the old config fetched.
        self.epochs: dict[str, int] = {}

    # -- reading -------------------------------------------------------------

    def lookup(self, key: Key, consumer: str, values: Callable[[str], str]) -> Entry | None:
        """The stored response for this request, if any (fresh or not); marks
        the URL recently used."""
        variants = self._lru.get(key)
        if variants is None:
            return None
        for entry in variants.entries.values():
            if entry.matches(consumer, values):
                return entry
        return None

    def stats(self) -> tuple[int, int]:
        """(bytes held, stored responses), for gateway_cache_bytes / _entries."""
        return int(self._lru.currsize), sum(len(v.entries) for v in self._lru.values())

    # -- writing -------------------------------------------------------------

    def epoch(self, route: str) -> int:
        return self.epochs.get(route, 0)

    def store(self, key: Key, entry: Entry, epoch: int) -> bool:
        """Store `entry` under `key` (replacing the same variant); False when
        it may not be (too large, or the route was purged since `epoch`)."""
        if entry.size > self.max_entry_bytes + ENTRY_OVERHEAD or epoch != self.epoch(key[0]):
            return False
        variants = self._lru.pop(key, None) or Variants()
        variants.add(entry)
        while variants.size > self.max_bytes and len(variants.entries) > 1:
            oldest = next(iter(variants.entries))
            variants.size -= variants.entries.pop(oldest).size
        if variants.size > self.max_bytes:
            return False
        # The LRU evicts least recently used URLs until the new weight fits.
        self._lru[key] = variants
        return True

    def invalidate(self, key: Key) -> int:
        """Drop every stored variant of one URL (RFC 9111 4.4); how many."""
        variants = self._lru.pop(key, None)
        return 0 if variants is None else len(variants.entries)

    def purge(self, route: str, prefix: str = "") -> int:
        """Drop the route's entries whose raw path starts with `prefix`; how many."""
        self.epochs[route] = self.epoch(route) + 1
        gone = [k for k in list(self._lru) if k[0] == route and k[3].startswith(prefix)]
        return sum(self.invalidate(key) for key in gone)

    def retain(self, routes: Mapping[str, object], changed: Iterable[str]) -> None:
        """After a reload: drop the entries of routes that are gone or whose
        cache config or match changed."""
        stale = set(changed)
        for route in {k[0] for k in list(self._lru)}:
            if route not in routes:
                stale.add(route)
        for route in stale:
            self.purge(route)
