"""Active health checks against real upstream servers on 127.0.0.1.

Each upstream's /healthz answers 200 or 503 as its `ok` flag says, or stalls
on an Event, and records every call together with whether the watched target
was in rotation at that instant. Because a probe's verdict is applied before
the next probe is sent, that record pins the exact probe after which the
target went out or came back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from pytest_aiohttp import AiohttpServer

from gateway.core.config import parse
from gateway.state.health import USER_AGENT, HealthMonitor
from gateway.state.metrics import Metrics
from gateway.state.snapshot import Runtime, Snapshot
from gateway.state.upstream import Pool, Target

# Every wait in this file is bounded by this.
WAIT = 5.0


@dataclass
class Call:
    at: float  # loop time
    ok: bool  # what the endpoint answered (or would have, when stalled)
    healthy: bool | None  # the watched target's flag when the probe arrived
    path_qs: str
    headers: CIMultiDictProxy[str]


@dataclass
class Upstream:
    url: str = ""
    ok: bool = True
    status_ok: int = 200
    stall: asyncio.Event | None = None
    script: list[bool] = field(default_factory=list)  # answers to give first, in order
    watch: Target | None = None
    calls: list[Call] = field(default_factory=list)
    server: web.Server | None = None

    async def healthz(self, request: web.Request) -> web.Response:
        healthy = None if self.watch is None else self.watch.healthy
        if self.script:
            self.ok = self.script.pop(0)
        self.calls.append(
            Call(
                asyncio.get_running_loop().time(),
                self.ok,
                healthy,
                request.path_qs,
                request.headers,
            )
        )
        if self.stall is not None:
            await self.stall.wait()
        return web.Response(status=self.status_ok if self.ok else 503, text="ok")

    def answered(self, ok: bool) -> list[Call]:
        return [c for c in self.calls if c.ok is ok]


UpstreamFactory = Callable[..., Awaitable[Upstream]]


@pytest.fixture
def upstream(aiohttp_server: AiohttpServer) -> UpstreamFactory:
    async def start(health_path: str = "/healthz", base: str = "") -> Upstream:
        up = Upstream()
        app = web.Application()
        app.router.add_get(base + health_path, up.healthz)
        server = await aiohttp_server(app)
        up.url = f"http://127.0.0.1:{server.port}{base}"
        return up

    return start


class Gateway:
    """The pieces of a gateway that health checks touch."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.metrics = Metrics()
        self.runtime = Runtime(metrics=self.metrics)
        self.monitor = HealthMonitor(rng if rng is not None else random.Random(4))

    def load(self, toml: str) -> Snapshot:
        # What server.py and reload.py do: build, swap, then sync, no await between.
        snapshot = self.runtime.build(parse(toml))
        self.monitor.sync(snapshot)
        return snapshot

    def sample(self, name: str, target: Target, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            name, {"upstream": target.upstream, "target": target.url, **labels}
        )


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    gateway = Gateway()
    yield gateway
    await gateway.monitor.close()
    await gateway.runtime.close()


def toml(
    *targets: str,
    name: str = "users",
    interval: float = 0.05,
    timeout: float = 0.5,
    healthy: int = 2,
    unhealthy: int = 3,
    path: str = "/healthz",
    health: bool = True,
    breaker_failures: int = 5,
    panic_threshold: float = 0.5,
) -> str:
    urls = ", ".join(f'"{url}"' for url in targets)
    text = f"""
[upstreams.{name}]
targets = [{urls}]
panic_threshold = {panic_threshold}
[upstreams.{name}.breaker]
failures = {breaker_failures}
"""
    if health:
        text += f"""
[upstreams.{name}.health]
path = "{path}"
interval = {interval}
timeout = {timeout}
healthy_threshold = {healthy}
unhealthy_threshold = {unhealthy}
"""
    return text


async def until(predicate: Callable[[], bool], limit: float = WAIT) -> None:
    async with asyncio.timeout(limit):
        # Polling: a target's healthy flag has no event to await.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def probe_tasks() -> list[asyncio.Task[object]]:
    """Probe tasks running and not told to stop."""
    return [
        t
        for t in asyncio.all_tasks()
        if t.get_name().startswith("health ") and not t.done() and not t.cancelling()
    ]


def target_of(snapshot: Snapshot, upstream: str = "users", index: int = 0) -> Target:
    return snapshot.pools[upstream].targets[index]


async def test_target_goes_out_after_exactly_unhealthy_threshold_failures(
    gw: Gateway, upstream: UpstreamFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.health")
    up = await upstream()
    target = up.watch = target_of(gw.load(toml(up.url, unhealthy=3)))
    await until(lambda: len(up.calls) >= 2)
    assert target.healthy

    up.ok = False
    await until(lambda: len(up.answered(False)) >= 4)
    # In rotation while the 1st, 2nd and 3rd failures were probed; out
    # once the 3rd was counted.
    assert [c.healthy for c in up.answered(False)[:4]] == [True, True, True, False]
    assert not target.healthy
    assert gw.sample("gateway_target_healthy", target) == 0.0
    assert (
        f"upstream users target {up.url} is now unhealthy: HTTP 503 (3 consecutive failures)"
        in caplog.messages
    )


async def test_target_comes_back_after_healthy_threshold_passes(
    gw: Gateway, upstream: UpstreamFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.health")
    up = await upstream()
    up.ok = False
    target = up.watch = target_of(gw.load(toml(up.url, unhealthy=1, healthy=3)))
    await until(lambda: not target.healthy)

    up.ok = True
    await until(lambda: len(up.answered(True)) >= 4)
    assert [c.healthy for c in up.answered(True)[:4]] == [False, False, False, True]
    assert target.healthy
    assert gw.sample("gateway_target_healthy", target) == 1.0
    assert f"upstream users target {up.url} is now healthy: 3 consecutive passes" in (
        caplog.messages
    )


async def test_a_pass_resets_the_failure_count(gw: Gateway, upstream: UpstreamFactory) -> None:
    up = await upstream()
    up.script = [False, True, False, True, False, True]  # never two failures in a row
    target = up.watch = target_of(gw.load(toml(up.url, unhealthy=2)))
    await until(lambda: len(up.calls) >= 7)
    assert all(c.healthy for c in up.calls[:7])
    assert target.healthy


async def test_redirect_passes_without_being_followed(
    gw: Gateway, upstream: UpstreamFactory
) -> None:
    up = await upstream()
    up.status_ok = 302  # no Location: following it would fail
    up.ok = True
    target = up.watch = target_of(gw.load(toml(up.url, unhealthy=1)))
    await until(lambda: len(up.calls) >= 3)
    assert target.healthy
    assert all(c.path_qs == "/healthz" for c in up.calls)


async def test_refused_connection_counts_as_failure(
    gw: Gateway, aiohttp_server: AiohttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.health")
    server = await aiohttp_server(web.Application())
    url = f"http://127.0.0.1:{server.port}"
    await server.close()  # nothing listens on the port any more
    target = target_of(gw.load(toml(url, unhealthy=2)))
    await until(lambda: not target.healthy)
    [line] = [m for m in caplog.messages if "is now unhealthy" in m]
    assert "ClientConnectorError" in line
    assert line.endswith("(2 consecutive failures)")


async def test_stalled_endpoint_fails_by_timeout(
    gw: Gateway, upstream: UpstreamFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.health")
    up = await upstream()
    up.stall = asyncio.Event()  # never set while probing
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        snapshot = gw.load(toml(up.url, interval=0.05, timeout=0.1, unhealthy=2))
        target = up.watch = target_of(snapshot)
        await until(lambda: not target.healthy)
        # two probes, each cut off at the timeout, not earlier
        assert loop.time() - started >= 2 * 0.1
        assert [c.healthy for c in up.calls[:2]] == [True, True]
        assert (
            f"upstream users target {up.url} is now unhealthy: no answer within 0.1s "
            "(2 consecutive failures)" in caplog.messages
        )
    finally:
        up.stall.set()  # let the server's handlers finish so its shutdown is quick


async def test_probe_request_shape_and_base_path(gw: Gateway, upstream: UpstreamFactory) -> None:
    up = await upstream(health_path="/ready", base="/base")
    gw.load(toml(up.url, path="/ready?deep=1"))
    await until(lambda: len(up.calls) >= 1)
    call = up.calls[0]
    assert call.path_qs == "/base/ready?deep=1"
    assert call.headers["User-Agent"] == USER_AGENT == "gateway-health/1"
    assert call.headers["Host"] == up.url.removeprefix("http://").removesuffix("/base")
    assert call.headers["Connection"] == "close"


async def test_probes_do_not_touch_proxy_metrics_in_flight_or_breaker(
    gw: Gateway, upstream: UpstreamFactory
) -> None:
    up = await upstream()
    up.ok = False
    target = up.watch = target_of(gw.load(toml(up.url, unhealthy=1, breaker_failures=1)))
    await until(lambda: len(up.calls) >= 3)
    for outcome in ("ok", "error", "timeout"):
        assert gw.sample("gateway_upstream_requests_total", target, outcome=outcome) == 0.0
    assert gw.sample("gateway_upstream_in_flight", target) == 0.0
    assert target.in_flight == 0
    assert target.breaker.consecutive_failures == 0
    assert target.breaker.state == "closed"


async def test_probe_round_trips_are_timed_in_their_own_histogram(
    gw: Gateway, upstream: UpstreamFactory
) -> None:
    up = await upstream()
    target = target_of(gw.load(toml(up.url)))
    await until(lambda: len(up.calls) >= 2)
    await until(
        lambda: (gw.sample("gateway_health_probe_duration_seconds_count", target) or 0) >= 2
    )
    total = gw.sample("gateway_health_probe_duration_seconds_sum", target)
    assert total is not None
    assert 0 < total < 1


async def test_two_targets_with_same_interval_do_not_probe_together(
    upstream: UpstreamFactory,
) -> None:
    # Seed 1 draws first-probe delays of 0.134 s and 0.847 s for interval 1.0:
    # wide enough apart that a loaded CI machine cannot blur them together.
    gw = Gateway(random.Random(1))
    try:
        a, b = await upstream(), await upstream()
        synced = asyncio.get_running_loop().time()
        gw.load(toml(a.url, b.url, interval=1.0))
        await until(lambda: bool(a.calls and b.calls))
    finally:
        await gw.monitor.close()
        await gw.runtime.close()
    firsts = [u.calls[0].at - synced for u in (a, b)]
    # Each first probe lands within one interval of sync, not at once ...
    assert all(0.05 <= t < 1.0 + 0.3 for t in firsts)
    # ... and the two of them apart (drawn 0.71 s apart).
    assert abs(firsts[0] - firsts[1]) > 0.4


async def test_first_probes_of_many_targets_spread_over_one_interval(
    gw: Gateway, upstream: UpstreamFactory
) -> None:
    ups = [await upstream() for _ in range(6)]
    synced = asyncio.get_running_loop().time()
    gw.load(toml(*(u.url for u in ups), interval=1.0))
    await until(lambda: all(u.calls for u in ups))
    firsts = sorted(u.calls[0].at - synced for u in ups)
    assert firsts[-1] < 1.0 + 0.3
    assert firsts[-1] - firsts[0] > 0.25


class HighJitter(random.Random):
    """First probe at once; every later wait at its longest, +10%."""

    def __init__(self) -> None:
        super().__init__(0)
        self.bounds: list[tuple[float, float]] = []

    def random(self) -> float:
        return 0.0

    def uniform(self, a: float, b: float) -> float:
        self.bounds.append((a, b))
        return b


async def test_later_probes_are_jittered_by_ten_percent(upstream: UpstreamFactory) -> None:
    rng = HighJitter()
    gw = Gateway(rng)
    try:
        up = await upstream()
        gw.load(toml(up.url, interval=0.1))
        await until(lambda: len(up.calls) >= 4)
    finally:
        await gw.monitor.close()
        await gw.runtime.close()
    times = [c.at for c in up.calls]
    assert all(b - a >= 0.11 - 0.002 for a, b in itertools.pairwise(times))
    assert set(rng.bounds) == {(0.9, 1.1)}


async def test_sync_dropping_health_table_stops_probes_and_restores_target(
    gw: Gateway, upstream: UpstreamFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.health")
    up = await upstream()
    up.ok = False
    snapshot = gw.load(toml(up.url, unhealthy=1))
    target = target_of(snapshot)
    await until(lambda: not target.healthy)
    assert len(probe_tasks()) == 1

    # The same Target under an upstream that lost its [health] table. Built by
    # hand so that it is the monitor, not Runtime.build, that restores it.
    pool = snapshot.pools["users"]
    passive = Pool(
        msgspec.structs.replace(pool.config, health=None),
        pool.targets,
        pool.client,
        pool.budget,
        pool.panic,
    )
    gw.monitor.sync(Snapshot(**{**snapshot.__dict__, "pools": {"users": passive}}))
    assert target.healthy
    assert gw.sample("gateway_target_healthy", target) == 1.0
    assert f"upstream users target {up.url} is now healthy: health checks removed" in (
        caplog.messages
    )
    await until(lambda: not probe_tasks())
    calls = len(up.calls)
    await asyncio.sleep(0.2)  # four intervals
    assert len(up.calls) == calls


async def test_reload_without_health_table_via_runtime(
    gw: Gateway, upstream: UpstreamFactory
) -> None:
    up = await upstream()
    up.ok = False
    target = target_of(gw.load(toml(up.url, unhealthy=1)))
    await until(lambda: not target.healthy)
    gw.load(toml(up.url, health=False))
    assert target.healthy
    await until(lambda: not probe_tasks())


async def test_sync_stops_probes_of_removed_targets_and_starts_new_ones(
    gw: Gateway, upstream: UpstreamFactory
) -> None:
    a, b = await upstream(), await upstream()
    gw.load(toml(a.url))
    await until(lambda: bool(a.calls))
    gw.load(toml(b.url))
    await until(lambda: len(probe_tasks()) == 1 and bool(b.calls))
    calls = len(a.calls)
    await asyncio.sleep(0.2)
    assert len(a.calls) == calls


async def test_unchanged_reload_keeps_the_running_task(
    gw: Gateway, upstream: UpstreamFactory
) -> None:
    up = await upstream()
    gw.load(toml(up.url))
    [task] = probe_tasks()
    gw.load(toml(up.url))
    gw.load(toml(up.url, name="orders", health=False) + toml(up.url, name="users"))
    assert probe_tasks() == [task]


async def test_changed_health_config_restarts_task_keeping_state(
    gw: Gateway, upstream: UpstreamFactory
) -> None:
    up = await upstream()
    up.ok = False
    target = up.watch = target_of(gw.load(toml(up.url, interval=0.2, unhealthy=1, healthy=2)))
    await until(lambda: not target.healthy)
    [old] = probe_tasks()

    up.ok = True
    await until(lambda: bool(up.calls) and up.calls[-1].ok)
    # Let that pass be counted: its answer takes a millisecond on loopback,
    # the next probe is 180 ms or more away.
    await asyncio.sleep(0.05)
    reloaded = target_of(gw.load(toml(up.url, interval=0.05, unhealthy=1, healthy=2)))
    assert reloaded is target
    assert not target.healthy  # the flag survives the restart
    [new] = probe_tasks()
    assert new is not old
    await until(lambda: target.healthy)
    # the pass before the reload counted: one more was enough
    assert [c.healthy for c in up.answered(True)].count(False) == 2


async def test_breaker_change_keeps_the_target_its_health_and_its_probes(
    gw: Gateway, upstream: UpstreamFactory
) -> None:
    up = await upstream()
    up.ok = False
    old = target_of(gw.load(toml(up.url, unhealthy=1, healthy=2)))
    await until(lambda: not old.healthy)
    [old_task] = probe_tasks()
    old_breaker = old.breaker
    # New breaker settings: a fresh breaker on the same Target (in-flight
    # count, health and gauges stay), and the probe task runs on.
    new = up.watch = target_of(gw.load(toml(up.url, unhealthy=1, healthy=2, breaker_failures=9)))
    assert new is old
    assert new.breaker is not old_breaker
    assert new.breaker.failures == 9
    assert not new.healthy
    assert gw.sample("gateway_target_healthy", new) == 0.0
    [new_task] = probe_tasks()
    assert new_task is old_task
    up.ok = True
    await until(lambda: new.healthy)


async def test_upstream_with_every_target_out_logs_a_warning(
    gw: Gateway, upstream: UpstreamFactory, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await upstream(), await upstream()
    a.ok = b.ok = False
    snapshot = gw.load(toml(a.url, b.url, unhealthy=1, panic_threshold=0))
    await until(lambda: not any(t.healthy for t in snapshot.pools["users"].targets))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "upstream users has no healthy target left: the pool panics unless "
        "panic_threshold is 0, then its requests get 503 no_healthy_target "
        "until a target passes 2 probes in a row"
    ]
    assert snapshot.pools["users"].pick("127.0.0.1") is None


async def test_close_leaves_no_tasks_and_sync_after_close_does_nothing(
    upstream: UpstreamFactory,
) -> None:
    gw = Gateway()
    up = await upstream()
    up.stall = asyncio.Event()  # a probe is mid-request when close() comes
    other = await upstream()
    try:
        snapshot = gw.load(toml(up.url, other.url, interval=0.05, timeout=2.0))
        await until(lambda: len(up.calls) >= 1)
        assert len(probe_tasks()) == 2
        await gw.monitor.close()
        assert not probe_tasks()
        gw.monitor.sync(snapshot)
        assert not probe_tasks()
        await gw.monitor.close()  # idempotent
    finally:
        up.stall.set()
        await gw.monitor.close()
        await gw.runtime.close()
