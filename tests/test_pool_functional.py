"""Never dark, end to end: real targets killed, restarted, frozen and flapping
under concurrent load, against the real gateway (CONTRACT.md "Never dark").

Targets are `tests/pool_target.py`, as processes (SIGKILL, SIGSTOP, restarted
on the same port) or in-process servers (flapping, accepting and never
answering). Load is a few client tasks for a bounded time; every request of
it must succeed. Cooldowns are long on purpose where the test shows they no
longer matter (panic mode, a passing probe), and timeouts are short.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import GatewayFactory, RunningGateway
from tests.pool_target import Target

ROOT = Path(__file__).resolve().parent.parent
WAIT = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Process:
    """A target process on a fixed port, to kill, freeze and start again."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.pool_target",
            str(self.port),
            self.name,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(WAIT):
            assert await self.proc.stdout.readline() == b"ready\n"

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen one must die too
            self.proc.kill()
            async with asyncio.timeout(WAIT):
                await self.proc.wait()

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture
async def processes() -> AsyncIterator[Callable[[str], Awaitable[Process]]]:
    made: list[Process] = []

    async def factory(name: str) -> Process:
        process = Process(name)
        await process.start()
        made.append(process)
        return process

    yield factory
    for process in made:
        await process.kill()


@pytest.fixture
async def targets() -> AsyncIterator[Callable[[str], Awaitable[Target]]]:
    made: list[Target] = []

    async def factory(name: str) -> Target:
        target = Target(name)
        await target.start()
        made.append(target)
        return target

    yield factory
    for target in made:
        await target.down()


def pool_toml(
    urls: list[str],
    *,
    cooldown: float = 30.0,
    failures: int = 5,
    read_timeout: float = 1.0,
    retries: int = 1,
    health: float | None = None,
) -> str:
    listed = ", ".join(f'"{url}"' for url in urls)
    text = f"""
        [upstreams.app]
        targets = [{listed}]
        [upstreams.app.breaker]
        failures = {failures}
        cooldown = {cooldown}
    """
    if health is not None:
        text += f"""
        [upstreams.app.health]
        path = "/healthz"
        interval = {health}
        timeout = 0.2
        healthy_threshold = 1
        unhealthy_threshold = 1
        """
    return (
        text
        + f"""
        [[routes]]
        name = "r"
        path = "/"
        upstream = "app"
        connect_timeout = 0.5
        read_timeout = {read_timeout}
        retries = {retries}
    """
    )


async def load(gw: RunningGateway, workers: int, seconds: float) -> collections.Counter[int]:
    """`workers` clients, each one request at a time, for `seconds`; status counts
    (0 for a request that got no HTTP answer at all)."""
    statuses: collections.Counter[int] = collections.Counter()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            while loop.time() < deadline:
                try:
                    async with session.get(gw.url + "/x") as response:
                        await response.read()
                        statuses[response.status] += 1
                except (aiohttp.ClientError, TimeoutError):
                    statuses[0] += 1

        await asyncio.gather(*(worker() for _ in range(workers)))
    return statuses


async def status_of(gw: RunningGateway, url: str) -> dict[str, Any]:
    assert gw.admin_url is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.admin_url + "/status") as response,
    ):
        doc = await response.json()
    for target in doc["upstreams"]["app"]["targets"]:
        if target["url"] == url:
            assert isinstance(target, dict)
            return target
    raise AssertionError(url)


async def get(gw: RunningGateway, path: str = "/x") -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session,
        session.get(gw.url + path) as response,
    ):
        return response.status, await response.read()


def only_ok(statuses: collections.Counter[int]) -> None:
    assert statuses[200] > 0
    assert statuses == {200: statuses[200]}, statuses


# -- rolling restarts, kills and freezes -----------------------------------------


@pytest.mark.parametrize(
    ("health", "cooldown"), [(None, 0.6), (0.1, 30.0)], ids=["passive", "active"]
)
async def test_rolling_restart_of_target_processes_fails_no_request(
    make_gateway: GatewayFactory,
    processes: Callable[[str], Awaitable[Process]],
    health: float | None,
    cooldown: float,
) -> None:
    # The scenario, about 15 times faster: each target killed, back
    # 0.3 s later, in turn. A 30 s cooldown used to keep a target out long
    # after it was back, and the second restart left nothing: 503
    # no_healthy_target. Passive: the cooldown scaled down as the default
    # (5 s) is to the 10 s cycle. Active: a passing probe ends even
    # a 30 s cooldown.
    a, b = await processes("a"), await processes("b")
    gw = await make_gateway(pool_toml([a.url, b.url], health=health, cooldown=cooldown))

    async def restarts() -> None:
        for _ in range(2):
            for process in (a, b):
                await asyncio.sleep(0.3)
                await process.kill()
                await asyncio.sleep(0.3)
                await process.start()

    statuses, _ = await asyncio.gather(load(gw, 3, 3.0), restarts())
    only_ok(statuses)


async def test_frozen_target_process_costs_no_request(
    make_gateway: GatewayFactory, processes: Callable[[str], Awaitable[Process]]
) -> None:
    # SIGSTOP: connections are accepted by the kernel and never answered.
    # Requests already sent time out and go to the other target (a GET that
    # got no response byte is safe to repeat).
    a, b = await processes("a"), await processes("b")
    gw = await make_gateway(pool_toml([a.url, b.url], read_timeout=0.3, cooldown=0.3))

    async def freeze() -> None:
        await asyncio.sleep(0.3)
        a.freeze()
        await asyncio.sleep(1.2)
        a.thaw()

    statuses, _ = await asyncio.gather(load(gw, 3, 2.0), freeze())
    only_ok(statuses)
    # Thawed, it serves again (its cooldown doubled at most a few times).
    seen: set[bytes] = set()
    async with asyncio.timeout(WAIT):
        while seen != {b"a", b"b"}:
            status, body = await get(gw)
            assert status == 200
            seen.add(body)
            await asyncio.sleep(0.05)


async def test_target_that_accepts_and_never_answers_costs_no_request(
    make_gateway: GatewayFactory, targets: Callable[[str], Awaitable[Target]]
) -> None:
    hung, b = await targets("hung"), await targets("b")
    hung.hang = True
    gw = await make_gateway(
        pool_toml([hung.url, b.url], read_timeout=0.2, cooldown=0.3, failures=2)
    )
    only_ok(await load(gw, 3, 1.5))
    # Out after two timeouts; then one trial per (doubling) cooldown.
    assert (await status_of(gw, hung.url))["breaker"] in ("open", "half_open")
    assert hung.requests <= 2 + 3 + 3  # failures, in flight at the trip, trials


async def test_target_flapping_every_200ms_costs_no_request(
    make_gateway: GatewayFactory, targets: Callable[[str], Awaitable[Target]]
) -> None:
    flappy, b = await targets("flappy"), await targets("b")
    gw = await make_gateway(pool_toml([flappy.url, b.url], cooldown=0.3, failures=1))

    async def flap() -> None:
        for _ in range(5):
            await asyncio.sleep(0.2)
            await flappy.down()
            await asyncio.sleep(0.2)
            await flappy.start()

    statuses, _ = await asyncio.gather(load(gw, 4, 2.0), flap())
    only_ok(statuses)
    assert flappy.requests > 0  # it was used between its crashes


# -- all down, all back ---------------------------------------------------------


async def test_all_targets_down_fail_fast_then_all_back_serve_within_one_interval(
    make_gateway: GatewayFactory, processes: Callable[[str], Awaitable[Process]]
) -> None:
    interval = 1.0
    a, b = await processes("a"), await processes("b")
    gw = await make_gateway(pool_toml([a.url, b.url], health=interval, failures=2))
    await a.kill()
    await b.kill()
    started = time.monotonic()
    answers = await asyncio.gather(*(get(gw) for _ in range(20)))
    # Refused at once: 502 (or 503 while every trial is in flight), no pile-up.
    assert {status for status, _ in answers} <= {502, 503}
    assert time.monotonic() - started < 1.0
    assert (await status_of(gw, a.url))["in_flight"] == 0

    await a.start()
    await b.start()
    back = time.monotonic()
    # Breakers open (cooldown 30 s) and probes not passed yet: panic gives the
    # targets early trials, so the first request is served, well within one
    # health interval.
    status, _ = await get(gw)
    assert status == 200
    assert time.monotonic() - back < interval
    only_ok(await load(gw, 2, 0.3))


async def test_hung_target_in_panic_holds_one_request_at_a_time(
    make_gateway: GatewayFactory,
    targets: Callable[[str], Awaitable[Target]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.upstream")
    hung = await targets("hung")
    hung.hang = True
    gw = await make_gateway(pool_toml([hung.url], read_timeout=0.3, failures=1, retries=0))
    assert (await get(gw))[0] == 504  # the trip
    assert (await status_of(gw, hung.url))["breaker"] == "open"
    started = time.monotonic()
    answers = await asyncio.gather(*(get(gw) for _ in range(10)))
    # Panic (0 of 1 available): one early trial reaches the hung target, the
    # other nine find nothing to try and get 503 at once.
    assert sorted(status for status, _ in answers) == [503] * 9 + [504]
    assert hung.most_in_flight == 1
    assert hung.requests == 2
    assert time.monotonic() - started < 0.3 + 0.5
    doc = await status_of(gw, hung.url)
    assert doc["breaker"] == "open"
    assert doc["breaker_cooldown"] == 60.0  # 30 s doubled by the failed trial, capped
    assert doc["in_flight"] == 0

    assert gw.admin_url is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.admin_url + "/metrics") as response,
    ):
        text = await response.text()
    assert 'gateway_upstream_panic_total{upstream="app"} 1.0' in text
    # The exposition sorts the labels: target, to, upstream.
    series = f'gateway_breaker_transitions_total{{target="{hung.url}",to='
    assert series + '"open",upstream="app"} 2.0' in text
    assert series + '"half_open",upstream="app"} 1.0' in text
    messages = caplog.messages
    assert any(m.startswith("upstream app target * panic: 0 of 1 targets") for m in messages)
    assert (
        f"upstream app target {hung.url} breaker open -> half_open: early trial: pool in panic"
        in messages
    )


async def test_passing_health_check_ends_a_long_cooldown(
    make_gateway: GatewayFactory, targets: Callable[[str], Awaitable[Target]]
) -> None:
    a, b = await targets("a"), await targets("b")
    gw = await make_gateway(pool_toml([a.url, b.url], health=0.1, failures=1, cooldown=30.0))
    await a.down()
    async with asyncio.timeout(WAIT):
        while (await status_of(gw, a.url))["breaker"] != "open":
            assert (await get(gw))[0] == 200  # retried on b
    await a.start()
    # Back within a probe interval or two, not 30 s.
    served = a.requests
    async with asyncio.timeout(2.0):
        while a.requests == served:
            assert (await get(gw))[0] == 200
            await asyncio.sleep(0.02)
    assert (await status_of(gw, a.url))["breaker"] == "closed"
