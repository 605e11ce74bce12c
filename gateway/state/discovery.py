"""DNS service discovery: lookups through aiodns, refreshed every `dns_refresh`.

One task per upstream with `dns`/`srv` targets, one aiodns resolver each
(an upstream may name its own `nameservers`). Each entry's last good set of
targets lives in `sets`, keyed by (upstream, entry as written); the runtime
adds it to the upstream's static targets at every snapshot build, so targets
that stay keep their state (targets are keyed by URL), new ones join, and gone
ones leave (their running requests finish on the Target they hold). A failed
or empty lookup keeps the last good set and is logged, once per change of
outcome rather than at every refresh. Record TTLs are not used: `dns_refresh`
is the one schedule (a zone answering a TTL of a year cannot freeze a set).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Final

import aiodns
import pycares
from aiodns.error import DNSError

from gateway.core.config import Config, DiscoveryConfig, TargetConfig, UpstreamConfig
from gateway.core.discovery import MAX_TARGETS, SrvRecord, best_srv, targets_from

log = logging.getLogger("gateway.discovery")

# Seconds one lookup round of an upstream may take, at most (c-ares retries
# inside it); also the bound on the start-up lookups.
LOOKUP_TIMEOUT: Final = 5.0
# SRV hosts looked up per entry, at most (each is one A and one AAAA query).
_MAX_SRV_HOSTS: Final = 64

Sets = dict[tuple[str, str], tuple[TargetConfig, ...]]
_TaskKey = tuple[str, tuple[DiscoveryConfig, ...], float, tuple[str, ...]]


class LookupFailed(Exception):
    pass


class Discovery:
    """The lookups of every upstream with dns/srv targets."""

    def __init__(self, sets: Sets, on_change: Callable[[], None]) -> None:
        self.sets = sets
        self._on_change = on_change
        self._tasks: dict[_TaskKey, asyncio.Task[None]] = {}
        self._outcome: dict[tuple[str, str], str] = {}  # the last logged outcome
        self._closed = False

    async def prime(self, config: Config) -> None:
        """One lookup of every entry before the first snapshot, bounded by
        LOOKUP_TIMEOUT: the gateway starts with the targets DNS has (or,
        if DNS does not answer, without them; the refreshes keep trying)."""
        upstreams = [up for up in config.upstreams.values() if up.discover]
        if upstreams:
            await asyncio.gather(*(self._round(up) for up in upstreams))

    def sync(self, config: Config) -> None:
        """Match the running lookups to `config`. No await: atomic with the swap."""
        if self._closed:
            return
        wanted: dict[_TaskKey, UpstreamConfig] = {}
        for up in config.upstreams.values():
            if up.discover:
                wanted[(up.name, up.discover, up.dns_refresh, up.nameservers)] = up
        for key in [k for k in self._tasks if k not in wanted]:
            self._tasks.pop(key).cancel()
        live = {(up.name, found.written) for up in wanted.values() for found in up.discover}
        for gone in [k for k in self.sets if k not in live]:
            del self.sets[gone]
            self._outcome.pop(gone, None)
        loop = asyncio.get_running_loop()
        for key, up in wanted.items():
            if key not in self._tasks:
                self._tasks[key] = loop.create_task(self._refresh(up), name=f"dns {up.name}")

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _refresh(self, up: UpstreamConfig) -> None:
        # A new or changed upstream looks up at once (prime() covered start-up,
        # but a reload may add one); then every dns_refresh seconds.
        while True:
            if await self._round(up):
                self._on_change()
            await asyncio.sleep(up.dns_refresh)

    async def _round(self, up: UpstreamConfig) -> bool:
        """Look up every entry of `up`; True when a set changed."""
        changed = False
        resolver = aiodns.DNSResolver(
            nameservers=list(up.nameservers) or None, timeout=min(2.0, up.dns_refresh), tries=2
        )
        try:
            for found in up.discover:
                key = (up.name, found.written)
                try:
                    async with asyncio.timeout(LOOKUP_TIMEOUT):
                        targets = await self._lookup(resolver, found)
                except asyncio.CancelledError:
                    raise
                except (DNSError, LookupFailed, TimeoutError, OSError, ValueError) as exc:
                    self._report(up, found, f"failed ({_reason(exc)})")
                    continue
                if not targets:
                    self._report(up, found, "found no usable address")
                    continue
                self._report(up, found, "ok")
                if self.sets.get(key) != targets:
                    before = {t.url for t in self.sets.get(key, ())}
                    after = {t.url for t in targets}
                    self.sets[key] = targets
                    changed = True
                    log.info(
                        "upstream %s %s %s: %d targets (+%d -%d)",
                        up.name,
                        found.kind,
                        found.written,
                        len(targets),
                        len(after - before),
                        len(before - after),
                    )
        finally:
            await resolver.close()
        return changed

    def _report(self, up: UpstreamConfig, found: DiscoveryConfig, outcome: str) -> None:
        key = (up.name, found.written)
        if self._outcome.get(key) == outcome:
            return
        self._outcome[key] = outcome
        if outcome != "ok":
            kept = len(self.sets.get(key, ()))
            log.warning(
                "upstream %s %s %s: lookup %s; keeping the last good set (%d targets)",
                up.name,
                found.kind,
                found.written,
                outcome,
                kept,
            )

    async def _lookup(
        self, resolver: aiodns.DNSResolver, found: DiscoveryConfig
    ) -> tuple[TargetConfig, ...]:
        if found.kind == "dns":
            addresses = await _addresses(resolver, found.name)
            return targets_from(found, ((a, found.port, found.weight) for a in addresses))
        result = await resolver.query_dns(found.name, "SRV")
        records = [
            SrvRecord(r.data.priority, r.data.weight, r.data.port, r.data.target)
            for r in result.answer
            if isinstance(r.data, pycares.SRVRecordData)
        ]
        chosen = best_srv(records)[:_MAX_SRV_HOSTS]
        triples: list[tuple[str, int, int]] = []
        for record in chosen:
            try:
                addresses = await _addresses(resolver, record.host.removesuffix("."))
            except (DNSError, LookupFailed):
                continue  # one host without addresses does not fail the others
            triples.extend((a, record.port, record.weight) for a in addresses)
            if len(triples) > MAX_TARGETS * 2:
                break
        return targets_from(found, triples)


async def _addresses(resolver: aiodns.DNSResolver, name: str) -> list[str]:
    """Every A and AAAA address of `name`; raises when both lookups fail."""
    answers = await asyncio.gather(
        resolver.query_dns(name, "A"), resolver.query_dns(name, "AAAA"), return_exceptions=True
    )
    addresses: list[str] = []
    errors: list[BaseException] = []
    for answer in answers:
        if isinstance(answer, BaseException):
            if isinstance(answer, asyncio.CancelledError):
                raise answer
            errors.append(answer)
            continue
        addresses.extend(
            r.data.addr
            for r in answer.answer
            if isinstance(r.data, pycares.ARecordData | pycares.AAAARecordData)
        )
    if not addresses and len(errors) == len(answers):
        # ENODATA for one family is normal (an IPv4-only name); both failing is not.
        raise errors[0] if isinstance(errors[0], Exception) else LookupFailed(str(errors[0]))
    return addresses


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, DNSError) and len(exc.args) >= 2:
        return str(exc.args[1])
    return str(exc) or type(exc).__name__
