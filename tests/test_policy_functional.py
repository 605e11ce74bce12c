"""Traffic policy end to end: breaker, health, retries, rate limits and CORS.

Real targets on 127.0.0.1 misbehave on cue (a `Backend` answers 200, 500 or
503, resets the connection before answering, or stalls on an Event; a
refusing target is a port whose server was stopped), the real gateway runs
from a TOML string, and every assertion is about what goes over the wire, the
admin `/status` and `/metrics`, or the access log. Cooldowns and probe
intervals are short, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

import gateway.edges.proxy
from gateway.core import retry
from tests.conftest import GatewayFactory, RunningGateway, UpstreamFactory, wait_for

# Every wait in this file is bounded by this.
WAIT = 5.0
COOLDOWN = 0.3
BREAKER = f"""
    [upstreams.app.breaker]
    failures = 2
    cooldown = {COOLDOWN}
"""
# Tests of the classic breaker (open means no traffic) turn panic mode off.
CLASSIC = "panic_threshold = 0\n"
# Retry tests must not have the breaker take failing targets out under them.
NO_BREAKER = """
    [upstreams.app.breaker]
    failures = 1000
"""

Mode = Literal["ok", "500", "503", "slow503", "reset", "stall"]


@dataclass
class Hit:
    method: str
    path_qs: str
    size: int  # request body bytes the target received
    at: float  # time.monotonic() on arrival


@dataclass
class Backend:
    """One target that does what `mode` says; records every proxied request.

    `/healthz` (the active probe) answers `health` and is not recorded.
    "stall" waits for `release` (bounded), then answers `after_stall`.
    """

    name: str
    mode: Mode = "ok"
    health: int = 200
    after_stall: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    entered: int = 0  # proxied requests whose head arrived (body maybe still coming)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/healthz":
            return web.Response(status=self.health)
        self.entered += 1
        # Read the whole body first: when this target answers, the body went up.
        body = await request.read()
        self.hits.append(Hit(request.method, request.path_qs, len(body), time.monotonic()))
        if self.mode == "reset":
            assert request.transport is not None
            request.transport.abort()  # before a byte of a response
            return web.Response()
        if self.mode == "stall":
            self.arrived.set()
            async with asyncio.timeout(WAIT * 2):
                await self.release.wait()
            return web.Response(status=self.after_stall, text=f"{self.name} after stall")
        if self.mode == "slow503":
            await asyncio.sleep(0.2)  # an overloaded target: busy, and slow to say so
        if self.mode in ("503", "slow503"):
            return web.Response(status=503, text=f"{self.name} busy")
        if self.mode == "500":
            return web.Response(status=500, text=f"{self.name} broke")
        return web.json_response({"backend": self.name, "size": len(body)}, headers=self.headers)


BackendFactory = Callable[[str], Awaitable[Backend]]


@pytest.fixture
async def backends(start_upstream: UpstreamFactory) -> AsyncIterator[BackendFactory]:
    made: list[Backend] = []

    async def factory(name: str) -> Backend:
        backend = Backend(name)
        backend.server = await start_upstream(backend.app())
        made.append(backend)
        return backend

    yield factory
    # Stalled handlers end before their servers close.
    for backend in made:
        backend.release.set()


async def refused_url(start_upstream: UpstreamFactory) -> str:
    """A loopback URL nobody listens on: connect is refused."""
    server = await start_upstream(web.Application())
    port = server.port
    await server.close()
    return f"http://127.0.0.1:{port}"


def gateway_toml(
    targets: list[str],
    *,
    route: str = "",
    route_tables: str = "",
    upstream_tables: str = "",
    name: str = "r",
    server: str = "",
) -> str:
    """One upstream `app` (round robin over `targets`) and one route on "/"."""
    listed = ", ".join(f'"{url}"' for url in targets)
    return f"""
        {server}
        [upstreams.app]
        balancer = "round_robin"
        targets = [{listed}]
        {upstream_tables}

        [[routes]]
        name = "{name}"
        path = "/"
        upstream = "app"
        {route}
        {route_tables}
    """


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def text(self) -> str:
        return self.body.decode()

    def error(self) -> str:
        """The code of a gateway-made JSON error, after checking its shape."""
        assert self.headers["Content-Type"].startswith("application/json")
        doc: dict[str, str] = json.loads(self.body)
        assert set(doc) == {"error", "message", "request_id"}
        assert doc["request_id"] == self.headers["X-Request-ID"]
        return doc["error"]


async def fetch(
    client: aiohttp.ClientSession,
    url: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> Answer:
    async with asyncio.timeout(WAIT):
        async with client.request(method, url, headers=headers, data=data) as resp:
            return Answer(resp.status, resp.headers, await resp.read())


async def metric(
    client: aiohttp.ClientSession, gw: RunningGateway, name: str, **labels: str
) -> float:
    """One sample from the admin /metrics, matched on name and every given label."""
    assert gw.admin_url is not None
    async with client.get(gw.admin_url + "/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")


async def target_status(
    client: aiohttp.ClientSession, gw: RunningGateway, url: str
) -> dict[str, Any]:
    """This target's entry in the admin /status document."""
    assert gw.admin_url is not None
    async with client.get(gw.admin_url + "/status") as resp:
        doc = await resp.json()
    for target in doc["upstreams"]["app"]["targets"]:
        if target["url"] == url:
            assert isinstance(target, dict)
            return target
    raise AssertionError(f"{url} not in /status")


async def breaker_is(
    client: aiohttp.ClientSession, gw: RunningGateway, url: str, state: str
) -> None:
    """/status and gateway_breaker_state agree that the breaker is in `state`."""
    numeric = {"closed": 0, "open": 1, "half_open": 2}[state]
    assert (await target_status(client, gw, url))["breaker"] == state
    assert await metric(client, gw, "gateway_breaker_state", upstream="app", target=url) == numeric


async def eventually(check: Callable[[], Awaitable[bool]], within: float = WAIT) -> None:
    """Poll an admin endpoint until `check` holds."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - admin endpoints, nothing to await
            await asyncio.sleep(0.02)


def log_records(gw: RunningGateway) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.log_lines() if line.startswith("{")]


# -- 1. Circuit breaker ---------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "status", "code", "outcome"),
    [
        ("503", 503, None, "error"),  # the target's own 503 goes to the client
        ("refuse", 502, "bad_gateway", "error"),
        ("reset", 502, "bad_gateway", "error"),
        ("timeout", 504, "upstream_timeout", "timeout"),
    ],
)
async def test_breaker_opens_after_consecutive_failures_and_answers_503(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    backends: BackendFactory,
    client: aiohttp.ClientSession,
    failure: str,
    status: int,
    code: str | None,
    outcome: str,
) -> None:
    backend: Backend | None = None
    if failure == "refuse":
        url = await refused_url(start_upstream)
    else:
        backend = await backends("a")
        backend.mode = "stall" if failure == "timeout" else "reset" if failure == "reset" else "503"
        url = backend.url
    # 2.5 s of cooldown: Retry-After is its ceiling, 3, not a rounded-down 2.
    gw = await make_gateway(
        gateway_toml(
            [url],
            route="read_timeout = 0.2",
            upstream_tables=CLASSIC + "[upstreams.app.breaker]\nfailures = 2\ncooldown = 2.5",
        )
    )
    await breaker_is(client, gw, url, "closed")
    for _ in range(2):
        answer = await fetch(client, gw.url + "/x")
        assert answer.status == status
        if code is None:
            assert answer.text() == "a busy"
        else:
            assert answer.error() == code
    await breaker_is(client, gw, url, "open")
    labels = {"upstream": "app", "target": url}
    assert (
        await metric(client, gw, "gateway_upstream_requests_total", **labels, outcome=outcome) == 2
    )
    assert await metric(client, gw, "gateway_upstream_requests_total", **labels, outcome="ok") == 0

    answer = await fetch(client, gw.url + "/x")
    assert answer.status == 503
    assert answer.error() == "no_healthy_target"
    assert answer.headers["Retry-After"] == "3"
    if backend is not None:
        assert len(backend.hits) == 2  # the open breaker sent nothing more
    assert log_records(gw)[-1]["error"] == "no_healthy_target"


async def test_open_breaker_target_is_skipped_by_the_balancer(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    a, b = await backends("a"), await backends("b")
    a.mode = "503"
    gw = await make_gateway(
        gateway_toml(
            [a.url, b.url], upstream_tables="[upstreams.app.breaker]\nfailures = 2\ncooldown = 5.0"
        )
    )
    for _ in range(4):  # round robin: a, b, a, b
        await fetch(client, gw.url + "/x")
    assert len(a.hits) == 2
    await breaker_is(client, gw, a.url, "open")
    await breaker_is(client, gw, b.url, "closed")
    for _ in range(6):
        answer = await fetch(client, gw.url + "/x")
        assert answer.status == 200
        assert json.loads(answer.body)["backend"] == "b"
    assert len(a.hits) == 2
    assert len(b.hits) == 8
    ok = await metric(
        client, gw, "gateway_upstream_requests_total", upstream="app", target=b.url, outcome="ok"
    )
    assert ok == 8


async def _open_one_target_breaker(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> tuple[RunningGateway, Backend]:
    """A gateway over one target whose breaker is open with its cooldown over."""
    backend = await backends("a")
    backend.mode = "503"
    gw = await make_gateway(gateway_toml([backend.url], upstream_tables=CLASSIC + BREAKER))
    for _ in range(2):
        assert (await fetch(client, gw.url + "/x")).status == 503
    await breaker_is(client, gw, backend.url, "open")
    answer = await fetch(client, gw.url + "/x")
    assert answer.error() == "no_healthy_target"
    assert answer.headers["Retry-After"] == "1"  # ceil(< 0.3 s), and at least 1
    assert len(backend.hits) == 2
    await asyncio.sleep(COOLDOWN + 0.05)
    # Reading the state never grants the trial: still "open" until a request comes.
    await breaker_is(client, gw, backend.url, "open")
    return gw, backend


async def _trial_with_concurrent_requests(
    gw: RunningGateway, backend: Backend, client: aiohttp.ClientSession
) -> Answer:
    """Six requests at once after the cooldown: one is the trial, five get 503."""
    backend.mode = "stall"
    tasks = [asyncio.create_task(fetch(client, gw.url + f"/t{i}")) for i in range(6)]
    async with asyncio.timeout(WAIT):
        await backend.arrived.wait()
    await wait_for(lambda: sum(task.done() for task in tasks) == 5)
    assert len(backend.hits) == 3  # exactly one trial reached the target
    refused = [task.result() for task in tasks if task.done()]
    for answer in refused:
        assert answer.status == 503
        assert answer.error() == "no_healthy_target"
        assert answer.headers["Retry-After"] == "1"
    await breaker_is(client, gw, backend.url, "half_open")
    (trial_task,) = [task for task in tasks if not task.done()]
    backend.release.set()
    return await trial_task


async def test_half_open_admits_one_trial_and_its_success_closes_the_breaker(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    gw, backend = await _open_one_target_breaker(make_gateway, backends, client)
    backend.after_stall = 200
    trial = await _trial_with_concurrent_requests(gw, backend, client)
    assert trial.status == 200
    await breaker_is(client, gw, backend.url, "closed")
    backend.mode = "ok"
    assert (await fetch(client, gw.url + "/x")).status == 200
    assert len(backend.hits) == 4


async def test_half_open_trial_failure_opens_the_breaker_again(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    gw, backend = await _open_one_target_breaker(make_gateway, backends, client)
    backend.after_stall = 503
    trial = await _trial_with_concurrent_requests(gw, backend, client)
    assert trial.status == 503
    assert trial.text() == "a after stall"  # the target's answer, relayed
    await breaker_is(client, gw, backend.url, "open")
    answer = await fetch(client, gw.url + "/x")
    assert answer.error() == "no_healthy_target"
    assert answer.headers["Retry-After"] == "1"
    assert len(backend.hits) == 3
    # A new cooldown, doubled by the failed trial, then a new trial.
    assert (await target_status(client, gw, backend.url))["breaker_cooldown"] == 2 * COOLDOWN
    await asyncio.sleep(COOLDOWN + 0.05)
    assert (await fetch(client, gw.url + "/x")).error() == "no_healthy_target"
    await asyncio.sleep(COOLDOWN)
    backend.mode = "ok"
    assert (await fetch(client, gw.url + "/x")).status == 200
    await breaker_is(client, gw, backend.url, "closed")


async def test_request_admitted_before_the_trip_cannot_free_the_trial(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    backend = await backends("a")
    gw = await make_gateway(gateway_toml([backend.url], upstream_tables=BREAKER))
    # A slow upload, admitted while the breaker is closed, stays in flight.
    _, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(
        b"POST /slow HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
    )
    await writer.drain()
    await wait_for(lambda: backend.entered == 1)
    backend.mode = "503"
    for _ in range(2):
        assert (await fetch(client, gw.url + "/x")).status == 503
    await asyncio.sleep(COOLDOWN + 0.05)
    backend.mode = "stall"
    trial = asyncio.create_task(fetch(client, gw.url + "/trial"))
    async with asyncio.timeout(WAIT):
        await backend.arrived.wait()
    await breaker_is(client, gw, backend.url, "half_open")
    # The upload's client goes away: its request ends without a verdict,
    # but it was not the trial, so the trial keeps the target to itself.
    writer.transport.abort()
    await eventually(
        lambda: _in_flight_is(client, gw, backend.url, 1)  # only the trial is left
    )
    answer = await fetch(client, gw.url + "/x")
    assert answer.error() == "no_healthy_target"
    await breaker_is(client, gw, backend.url, "half_open")
    assert backend.entered == 4
    backend.release.set()
    assert (await trial).status == 200
    await breaker_is(client, gw, backend.url, "closed")


async def _in_flight_is(
    client: aiohttp.ClientSession, gw: RunningGateway, url: str, count: int
) -> bool:
    in_flight = (await target_status(client, gw, url))["in_flight"]
    gauge = await metric(client, gw, "gateway_upstream_in_flight", upstream="app", target=url)
    return bool(in_flight == gauge == count)


async def test_target_500_is_an_answer_not_a_breaker_failure(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    backend = await backends("a")
    gw = await make_gateway(gateway_toml([backend.url], upstream_tables=BREAKER))
    # 503, 500, 503: the 500 breaks the run of consecutive failures.
    for mode in ("503", "500", "503", "500", "500", "500"):
        backend.mode = mode
        answer = await fetch(client, gw.url + "/x")
        assert answer.status == int(mode)
        assert answer.text() == ("a busy" if mode == "503" else "a broke")
    assert len(backend.hits) == 6
    await breaker_is(client, gw, backend.url, "closed")
    labels = {"upstream": "app", "target": backend.url}
    assert (
        await metric(client, gw, "gateway_upstream_requests_total", **labels, outcome="error") == 2
    )
    assert await metric(client, gw, "gateway_upstream_requests_total", **labels, outcome="ok") == 4
    assert (
        await metric(client, gw, "gateway_requests_total", route="r", method="GET", code="500") == 4
    )


async def test_client_body_errors_are_no_breaker_failures(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    backend = await backends("a")
    gw = await make_gateway(
        gateway_toml([backend.url], route="max_body_bytes = 10", upstream_tables=BREAKER)
    )

    async def too_long() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 8

    for _ in range(3):  # chunked: cut with 413 after its first bytes went up
        async with asyncio.timeout(WAIT):
            async with client.post(gw.url + "/up", data=too_long()) as resp:
                assert resp.status == 413
    await breaker_is(client, gw, backend.url, "closed")
    assert (await fetch(client, gw.url + "/x")).status == 200


# -- 2. Active health checks ----------------------------------------------------

HEALTH = """
    [upstreams.app.health]
    path = "/healthz"
    interval = 0.05
    timeout = 1.0
    healthy_threshold = 2
    unhealthy_threshold = 2
"""


async def _healthy_is(
    client: aiohttp.ClientSession, gw: RunningGateway, url: str, healthy: bool
) -> bool:
    status = (await target_status(client, gw, url))["healthy"] is healthy
    gauge = await metric(client, gw, "gateway_target_healthy", upstream="app", target=url)
    return status and gauge == (1.0 if healthy else 0.0)


async def test_health_checks_take_a_target_out_and_bring_it_back(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    a, b = await backends("a"), await backends("b")
    gw = await make_gateway(gateway_toml([a.url, b.url], upstream_tables=HEALTH))
    assert await _healthy_is(client, gw, a.url, True)
    a.health = 503
    await eventually(lambda: _healthy_is(client, gw, a.url, False))
    assert await _healthy_is(client, gw, b.url, True)
    a.hits.clear()
    for _ in range(6):
        answer = await fetch(client, gw.url + "/x")
        assert json.loads(answer.body)["backend"] == "b"
    assert a.hits == []

    a.health = 200
    await eventually(lambda: _healthy_is(client, gw, a.url, True))
    seen = {json.loads((await fetch(client, gw.url + "/x")).body)["backend"] for _ in range(4)}
    assert seen == {"a", "b"}
    # Probes are not upstream requests: only the 2 proxied ones are counted.
    ok = await metric(
        client, gw, "gateway_upstream_requests_total", upstream="app", target=a.url, outcome="ok"
    )
    assert ok == len(a.hits) == 2


async def test_every_target_unhealthy_gets_503_no_healthy_target(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    a, b = await backends("a"), await backends("b")
    gw = await make_gateway(gateway_toml([a.url, b.url], upstream_tables=CLASSIC + HEALTH))
    a.health = b.health = 500
    for backend in (a, b):
        await eventually(lambda: _healthy_is(client, gw, backend.url, False))  # noqa: B023
    answer = await fetch(client, gw.url + "/x")
    assert answer.status == 503
    assert answer.error() == "no_healthy_target"
    assert answer.headers["Retry-After"] == "1"
    assert a.hits == b.hits == []
    b.health = 200
    await eventually(lambda: _healthy_is(client, gw, b.url, True))
    assert (await fetch(client, gw.url + "/x")).status == 200


# -- 3. Retries -----------------------------------------------------------------


async def test_get_to_a_refusing_target_is_retried_on_the_other(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    backends: BackendFactory,
    client: aiohttp.ClientSession,
) -> None:
    dead = await refused_url(start_upstream)
    b = await backends("b")
    gw = await make_gateway(
        gateway_toml([dead, b.url], route="retries = 2", upstream_tables=NO_BREAKER)
    )
    for _ in range(4):
        answer = await fetch(client, gw.url + "/x")
        assert answer.status == 200
        assert json.loads(answer.body)["backend"] == "b"
    assert len(b.hits) == 4
    refused = await metric(
        client, gw, "gateway_upstream_requests_total", upstream="app", target=dead, outcome="error"
    )
    assert refused == 2  # round robin sent every other first attempt to it
    assert (
        await metric(client, gw, "gateway_requests_total", route="r", method="GET", code="200") == 4
    )
    records = log_records(gw)[-4:]
    assert [(r["status"], r["target"], r["error"]) for r in records] == [(200, b.url, None)] * 4


async def test_get_answered_503_is_retried_on_the_other_target(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    a, b = await backends("a"), await backends("b")
    a.mode = "503"
    gw = await make_gateway(
        gateway_toml([a.url, b.url], route="retries = 2", upstream_tables=NO_BREAKER)
    )
    for _ in range(4):
        answer = await fetch(client, gw.url + "/x")
        assert answer.status == 200
        assert json.loads(answer.body)["backend"] == "b"
    assert len(a.hits) == 2
    assert len(b.hits) == 4


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_request_whose_body_went_up_is_not_retried_after_503(
    make_gateway: GatewayFactory,
    backends: BackendFactory,
    client: aiohttp.ClientSession,
    method: str,
) -> None:
    a, b = await backends("a"), await backends("b")
    a.mode = "503"
    gw = await make_gateway(
        gateway_toml([a.url, b.url], route="retries = 2", upstream_tables=NO_BREAKER)
    )
    answers = [await fetch(client, gw.url + "/x", method, data=b"payload") for _ in range(2)]
    assert sorted(answer.status for answer in answers) == [200, 503]
    (busy,) = [answer for answer in answers if answer.status == 503]
    assert busy.text() == "a busy"  # the target's own 503, not a gateway error
    assert [(hit.method, hit.size) for hit in a.hits] == [(method, 7)]
    assert [(hit.method, hit.size) for hit in b.hits] == [(method, 7)]


async def test_post_to_a_refusing_target_is_retried(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    backends: BackendFactory,
    client: aiohttp.ClientSession,
) -> None:
    dead = await refused_url(start_upstream)
    b = await backends("b")
    gw = await make_gateway(
        gateway_toml([dead, b.url], route="retries = 2", upstream_tables=NO_BREAKER)
    )
    payload = b"x" * 100_000
    for _ in range(2):
        answer = await fetch(client, gw.url + "/x", "POST", data=payload)
        assert answer.status == 200
        assert json.loads(answer.body) == {"backend": "b", "size": len(payload)}
    assert [(hit.method, hit.size) for hit in b.hits] == [("POST", len(payload))] * 2
    refused = await metric(
        client, gw, "gateway_upstream_requests_total", upstream="app", target=dead, outcome="error"
    )
    assert refused == 1


async def test_each_retry_goes_to_a_different_target(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    targets = [await backends(name) for name in "abc"]
    for backend in targets:
        backend.mode = "503"
    gw = await make_gateway(
        gateway_toml([t.url for t in targets], route="retries = 2", upstream_tables=NO_BREAKER)
    )
    answer = await fetch(client, gw.url + "/x")
    assert answer.status == 503
    assert answer.text().endswith(" busy")  # the last target's answer
    assert [len(t.hits) for t in targets] == [1, 1, 1]


async def test_retry_budget_caps_concurrent_retries_under_load(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    a, b = await backends("a"), await backends("b")
    a.mode = b.mode = "503"
    gw = await make_gateway(
        gateway_toml([a.url, b.url], route="retries = 2", upstream_tables=NO_BREAKER)
    )
    # A lone client spends the rate rule's window (10 retries/s over 10 s
    # plus 20 % of first attempts: 112 after 60 requests) on 120 retries;
    # the concurrency rule's floor (3 in flight) still lets every one go.
    lone = 60
    for _ in range(lone):
        assert (await fetch(client, gw.url + "/x")).status == 503
    assert len(a.hits) + len(b.hits) == 3 * lone
    # The window spent, 20 requests failing together get what the
    # concurrency rule has room for: retries in flight <= max(3, 20 % of
    # 20 in flight) = 4, so 4 retry (then at most 4 once more); without
    # the budget every request would have made 2 retries (40).
    a.mode = b.mode = "slow503"
    first_attempts = 20
    answers = await asyncio.gather(*(fetch(client, gw.url + "/x") for _ in range(first_attempts)))
    assert {answer.status for answer in answers} == {503}
    retries = len(a.hits) + len(b.hits) - 3 * lone - first_attempts
    assert 3 <= retries <= 8


async def test_requests_parked_on_a_hung_target_all_retry_when_it_times_out_together(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    # A frozen target (SIGSTOP): it accepts and never answers, and every
    # request parked on it reaches read_timeout within milliseconds of the
    # others. A budget of concurrent retries alone (max(3, 20 % of 16 in
    # flight)) retried 3 of 16 and answered the rest 504; the rate rule's
    # floor has room for all of them.
    hung, ok = await backends("hung"), await backends("ok")
    hung.mode = "stall"
    gw = await make_gateway(
        gateway_toml(
            [hung.url, ok.url], route="retries = 1\nread_timeout = 0.3", upstream_tables=NO_BREAKER
        )
    )
    parked = 16
    # Round robin: every other request parks on the hung target; those on
    # `ok` finish at once, so the 16 parked ones are all that is in flight.
    answers = await asyncio.gather(*(fetch(client, gw.url + "/x") for _ in range(2 * parked)))
    assert [answer.status for answer in answers] == [200] * (2 * parked)
    assert len(hung.hits) == parked
    assert len(ok.hits) == 2 * parked


async def test_a_retry_storm_stays_within_a_fifth_of_the_first_attempts_plus_the_floor(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    # Every target answers 503 to everything; 50 clients keep 1000 GETs
    # going. Without a budget each request would be tried on all 3 targets
    # (3000 upstream requests); the rate rule allows 20 % of the first
    # attempts plus its floor of 10 retries/s over 10 s, and the concurrency
    # rule 20 % of the requests in flight: whichever has room, not both.
    targets = [await backends(name) for name in "abc"]
    for backend in targets:
        backend.mode = "503"
    gw = await make_gateway(
        gateway_toml([t.url for t in targets], route="retries = 2", upstream_tables=NO_BREAKER)
    )
    first_attempts, connections = 1000, 50
    gate = asyncio.Semaphore(connections)

    async def one() -> int:
        async with gate:
            return (await fetch(client, gw.url + "/x")).status

    async with asyncio.timeout(WAIT * 4):
        statuses = await asyncio.gather(*(one() for _ in range(first_attempts)))
    assert set(statuses) == {503}
    seen = sum(len(t.hits) for t in targets)
    floor = 10 * 10
    # The rule that lets a retry in counts it for both, so the two add up
    # only by what the concurrency rule has room for once the window is
    # spent: 20 % of the 50 in flight (1 to 3 over the bound were measured).
    assert first_attempts + floor <= seen <= first_attempts * 1.2 + floor + connections * 0.2


async def test_one_client_at_a_time_never_runs_out_of_retries_beside_a_dead_target(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    backends: BackendFactory,
    client: aiohttp.ClientSession,
) -> None:
    # The low-rate budget defect: a floor of 3 retries per 10 s (plus 20 % of
    # first attempts) was spent after a few requests to the refusing target,
    # and the client got 502 while b was there all along.
    dead = await refused_url(start_upstream)
    b = await backends("b")
    gw = await make_gateway(
        gateway_toml([dead, b.url], route="retries = 1", upstream_tables=NO_BREAKER)
    )
    for _ in range(30):
        answer = await fetch(client, gw.url + "/x")
        assert answer.status == 200
    assert len(b.hits) == 30


async def test_target_answering_503_to_a_get_costs_a_lone_client_nothing(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    a, b = await backends("a"), await backends("b")
    a.mode = "503"
    gw = await make_gateway(
        gateway_toml([a.url, b.url], route="retries = 1", upstream_tables=NO_BREAKER)
    )
    for _ in range(30):
        assert (await fetch(client, gw.url + "/x")).status == 200
    assert len(a.hits) == 15


async def test_refusing_target_is_ejected_by_default_without_a_breaker_table(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    backends: BackendFactory,
    client: aiohttp.ClientSession,
) -> None:
    dead = await refused_url(start_upstream)
    b = await backends("b")
    gw = await make_gateway(gateway_toml([dead, b.url]))  # retries = 0, no [breaker]
    statuses = [(await fetch(client, gw.url + "/x")).status for _ in range(40)]
    # The default breaker (failures = 5) takes the dead target out after its
    # 5th refusal; without it, every other request would fail (20 of 40).
    assert statuses.count(502) == 5
    assert statuses.count(200) == 35
    await breaker_is(client, gw, dead, "open")


async def test_backoff_is_applied_between_attempts_and_bounded(
    make_gateway: GatewayFactory,
    backends: BackendFactory,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    delays: list[tuple[int, float]] = []

    def longest_backoff(attempt: int) -> float:
        delay = retry.backoff(attempt, rng=lambda: 0.999)  # the top of the jitter range
        delays.append((attempt, delay))
        return delay

    monkeypatch.setattr(gateway.edges.proxy, "backoff", longest_backoff)
    targets = [await backends(name) for name in "abc"]
    for backend in targets:
        backend.mode = "503"
    gw = await make_gateway(
        gateway_toml([t.url for t in targets], route="retries = 2", upstream_tables=NO_BREAKER)
    )
    assert (await fetch(client, gw.url + "/x")).status == 503
    assert [attempt for attempt, _ in delays] == [0, 1]
    assert all(0.0 < delay <= 1.0 for _, delay in delays)
    arrivals = sorted(hit.at for t in targets for hit in t.hits)
    assert len(arrivals) == 3
    for (_, delay), before, after in zip(delays, arrivals[:-1], arrivals[1:], strict=True):
        assert after - before >= delay


# -- 4. Rate limits -------------------------------------------------------------


def limited_toml(url: str, key: str = "client_ip", server: str = "", route: str = "") -> str:
    return gateway_toml(
        [url],
        name="limited",
        route=route,
        server=server,
        route_tables=f"""
            [routes.rate_limit]
            rate = 1.0
            burst = 3
            key = "{key}"
        """,
    )


async def statuses(
    client: aiohttp.ClientSession, gw: RunningGateway, n: int, headers: dict[str, str]
) -> list[int]:
    return [(await fetch(client, gw.url + "/x", headers=headers)).status for _ in range(n)]


async def test_rate_limit_headers_on_every_answer_and_429_when_empty(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    backend = await backends("a")
    backend.headers = {"X-RateLimit-Limit": "999"}  # the gateway's numbers win
    gw = await make_gateway(limited_toml(backend.url))
    for left in (2, 1, 0):
        answer = await fetch(client, gw.url + "/x")
        assert answer.status == 200
        assert answer.headers["RateLimit-Policy"] == '"limited";q=3;w=3'
        assert answer.headers["RateLimit"] == f'"limited";r={left};t={3 - left}'
        assert answer.headers.getall("X-RateLimit-Limit") == ["3"]
        assert answer.headers["X-RateLimit-Remaining"] == str(left)
        assert answer.headers["X-RateLimit-Reset"] == str(3 - left)
        assert "Retry-After" not in answer.headers
    answer = await fetch(client, gw.url + "/x")
    assert answer.status == 429
    assert answer.error() == "rate_limited"
    assert int(answer.headers["Retry-After"]) >= 1
    assert answer.headers["RateLimit-Policy"] == '"limited";q=3;w=3'
    assert answer.headers["RateLimit"] == '"limited";r=0;t=3'
    assert answer.headers["X-RateLimit-Limit"] == "3"
    assert answer.headers["X-RateLimit-Remaining"] == "0"
    # The 429's reset is its Retry-After (the next token), not "until full".
    assert answer.headers["X-RateLimit-Reset"] == answer.headers["Retry-After"] == "1"
    assert len(backend.hits) == 3
    assert await metric(client, gw, "gateway_rate_limited_total", route="limited") == 1
    assert (
        await metric(
            client, gw, "gateway_requests_total", route="limited", method="GET", code="429"
        )
        == 1
    )


async def test_rate_limit_headers_on_gateway_errors_of_a_limited_route(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    dead = await refused_url(start_upstream)
    gw = await make_gateway(limited_toml(dead, route="max_body_bytes = 10"))
    # The contract's order: rate limit, then body size; the 413 took its token.
    answer = await fetch(client, gw.url + "/x", "POST", data=b"x" * 11)
    assert answer.status == 413
    assert answer.headers["RateLimit"] == '"limited";r=2;t=1'
    assert answer.headers["X-RateLimit-Remaining"] == "2"
    answer = await fetch(client, gw.url + "/x")
    assert answer.status == 502
    assert answer.error() == "bad_gateway"
    assert answer.headers["RateLimit-Policy"] == '"limited";q=3;w=3'
    assert answer.headers["RateLimit"] == '"limited";r=1;t=2'
    assert answer.headers["X-RateLimit-Remaining"] == "1"


async def test_an_oversized_body_over_the_rate_limit_is_a_429_not_a_413(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    # CONTRACT.md, order of the checks: rate limit (429) before body size (413).
    dead = await refused_url(start_upstream)
    gw = await make_gateway(limited_toml(dead, route="max_body_bytes = 10"))
    codes = [(await fetch(client, gw.url + "/x", "POST", data=b"x" * 11)).status for _ in range(4)]
    assert codes == [413, 413, 413, 429]


async def test_rate_limit_by_header_keeps_a_bucket_per_key(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    backend = await backends("a")
    gw = await make_gateway(limited_toml(backend.url, key="header:X-Api-Key"))
    assert await statuses(client, gw, 4, {"X-Api-Key": "alice"}) == [200, 200, 200, 429]
    assert await statuses(client, gw, 4, {"X-Api-Key": "bob"}) == [200, 200, 200, 429]
    # Absent header: the client IP's bucket, which neither key touched.
    assert await statuses(client, gw, 4, {}) == [200, 200, 200, 429]
    # A key spelled like an IP is still a key: it cannot drain (or reuse)
    # the bucket of the client at that address.
    assert await statuses(client, gw, 4, {"X-Api-Key": "127.0.0.1"}) == [200, 200, 200, 429]
    assert await metric(client, gw, "gateway_rate_limited_total", route="limited") == 4
    assert len(gw.gateway.runtime.buckets["limited"].store) == 4


async def test_rate_limit_by_route_shares_one_bucket(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    backend = await backends("a")
    gw = await make_gateway(limited_toml(backend.url, key="route"))
    results = [
        (await fetch(client, gw.url + "/x", headers={"X-Api-Key": key})).status
        for key in ("a", "b", "c", "d")
    ]
    assert results == [200, 200, 200, 429]


TRUSTING_SERVER = """
    [server]
    listen = ["127.0.0.1:0"]
    admin = "127.0.0.1:0"
    trusted_proxies = ["127.0.0.0/8"]
"""


async def test_trusted_proxy_forwarded_for_is_the_rate_limit_key(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    backend = await backends("a")
    gw = await make_gateway(limited_toml(backend.url, server=TRUSTING_SERVER))
    first = {"X-Forwarded-For": "203.0.113.7"}
    assert await statuses(client, gw, 4, first) == [200, 200, 200, 429]
    assert log_records(gw)[-1]["client"] == "203.0.113.7"
    assert await statuses(client, gw, 4, {"X-Forwarded-For": "203.0.113.8"}) == [
        200,
        200,
        200,
        429,
    ]
    # The loopback peer itself (no XFF) has a bucket of its own too.
    assert await statuses(client, gw, 4, {}) == [200, 200, 200, 429]


async def test_forwarded_for_from_an_untrusted_peer_is_not_the_key(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    backend = await backends("a")
    gw = await make_gateway(limited_toml(backend.url))
    results = [
        (await fetch(client, gw.url + "/x", headers={"X-Forwarded-For": xff})).status
        for xff in ("203.0.113.7", "203.0.113.8", "198.51.100.1", "198.51.100.2")
    ]
    assert results == [200, 200, 200, 429]
    assert {r["client"] for r in log_records(gw)} == {"127.0.0.1"}


# -- 5. CORS through the proxy --------------------------------------------------

ORIGIN = "https://app.example"
CORS = """
    [routes.cors]
    allow_origins = ["https://app.example"]
    allow_methods = ["GET", "PUT"]
    allow_headers = ["X-Token"]
    expose_headers = ["X-Total"]
    allow_credentials = true
    max_age = 600
"""


def cors_toml(url: str) -> str:
    return f"""
        [upstreams.app]
        targets = ["{url}"]

        [[routes]]
        name = "api"
        path = "/api"
        methods = ["GET", "PUT"]
        upstream = "app"
        {CORS}

        [[routes]]
        name = "limited"
        path = "/limited"
        upstream = "app"
        [routes.rate_limit]
        rate = 1.0
        burst = 1
        {CORS}
    """


async def test_cors_preflight_is_answered_by_the_gateway(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    backend = await backends("a")
    gw = await make_gateway(cors_toml(backend.url))
    answer = await fetch(
        client,
        gw.url + "/api/items/7",
        "OPTIONS",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "x-token, content-type",
        },
    )
    assert answer.status == 204
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert answer.headers["Access-Control-Allow-Credentials"] == "true"
    assert answer.headers["Access-Control-Allow-Methods"] == "GET, PUT"
    assert answer.headers["Access-Control-Allow-Headers"] == (
        "X-Token, Accept, Accept-Language, Content-Language, Content-Type"
    )
    assert answer.headers["Access-Control-Max-Age"] == "600"
    assert answer.headers["Vary"] == (
        "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    )
    assert answer.headers["X-Request-ID"]
    assert backend.hits == []
    # Not a preflight (no Access-Control-Request-Method): routed by methods.
    answer = await fetch(client, gw.url + "/api/items/7", "OPTIONS", headers={"Origin": ORIGIN})
    assert answer.status == 405
    assert answer.error() == "method_not_allowed"
    assert backend.hits == []


@pytest.mark.parametrize(
    "request_headers",
    [
        {"Origin": "https://evil.example", "Access-Control-Request-Method": "PUT"},
        {"Origin": ORIGIN, "Access-Control-Request-Method": "DELETE"},
        {
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "x-other",
        },
    ],
    ids=["origin", "method", "header"],
)
async def test_cors_refused_preflight_is_204_without_allow_headers(
    make_gateway: GatewayFactory,
    backends: BackendFactory,
    client: aiohttp.ClientSession,
    request_headers: dict[str, str],
) -> None:
    backend = await backends("a")
    gw = await make_gateway(cors_toml(backend.url))
    answer = await fetch(client, gw.url + "/api/x", "OPTIONS", headers=request_headers)
    assert answer.status == 204
    assert not [name for name in answer.headers if name.lower().startswith("access-control-")]
    assert answer.headers["Vary"] == (
        "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    )
    assert backend.hits == []


async def test_cors_headers_are_merged_into_the_targets_response(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    backend = await backends("a")
    backend.headers = {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "POST",
        "Access-Control-Expose-Headers": "X-Secret",
        "Vary": "Accept-Encoding",
        "X-Total": "5",
    }
    gw = await make_gateway(cors_toml(backend.url))
    answer = await fetch(client, gw.url + "/api/x", headers={"Origin": ORIGIN})
    assert answer.status == 200
    assert answer.headers.getall("Access-Control-Allow-Origin") == [ORIGIN]
    assert answer.headers["Access-Control-Allow-Credentials"] == "true"
    assert answer.headers.getall("Access-Control-Expose-Headers") == ["X-Total"]
    assert "Access-Control-Allow-Methods" not in answer.headers
    assert answer.headers.getall("Vary") == ["Accept-Encoding, Origin"]
    assert answer.headers["X-Total"] == "5"

    # No Origin (or a foreign one): none of the target's Access-Control-*
    # survive, and the answer still varies on Origin for caches.
    for headers in ({}, {"Origin": "https://evil.example"}):
        answer = await fetch(client, gw.url + "/api/x", headers=headers)
        assert answer.status == 200
        assert not [name for name in answer.headers if name.lower().startswith("access-control-")]
        assert answer.headers["Vary"] == "Accept-Encoding, Origin"


async def test_cors_headers_on_a_429(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    backend = await backends("a")
    gw = await make_gateway(cors_toml(backend.url))
    assert (await fetch(client, gw.url + "/limited", headers={"Origin": ORIGIN})).status == 200
    answer = await fetch(client, gw.url + "/limited", headers={"Origin": ORIGIN})
    assert answer.status == 429
    assert answer.error() == "rate_limited"
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert answer.headers["Access-Control-Allow-Credentials"] == "true"
    assert answer.headers["Access-Control-Expose-Headers"] == "X-Total"
    assert answer.headers["Vary"] == "Origin"
    assert answer.headers["Retry-After"] == "1"
    assert answer.headers["RateLimit"] == '"limited";r=0;t=1'
    assert len(backend.hits) == 1


async def test_preflight_on_a_limited_route_shows_the_limit_and_takes_no_token(
    make_gateway: GatewayFactory, backends: BackendFactory, client: aiohttp.ClientSession
) -> None:
    backend = await backends("a")
    gw = await make_gateway(cors_toml(backend.url))
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "PUT"}
    for _ in range(3):
        answer = await fetch(client, gw.url + "/limited", "OPTIONS", headers=preflight)
        assert answer.status == 204
        assert answer.headers["RateLimit-Policy"] == '"limited";q=1;w=1'
        assert answer.headers["RateLimit"] == '"limited";r=1;t=0'
        assert answer.headers["X-RateLimit-Remaining"] == "1"
    # The bucket (burst 1) is still full: preflights took nothing from it.
    assert (await fetch(client, gw.url + "/limited", headers={"Origin": ORIGIN})).status == 200
    assert backend.hits != []
