"""dns and srv targets against a real DNS server on loopback whose records
change during the test (tests/dns_server.py). Record values are 127.x
addresses only, or addresses the gateway must refuse to use (0.0.0.0,
multicast): nothing outside loopback is ever connected to."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import GatewayFactory, RunningGateway, wait_for
from tests.dns_server import DnsServer
from tests.redis_server import free_port

REFRESH = 0.2
WAIT = 5.0

Named = Callable[[str, int], Awaitable[None]]


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def named() -> AsyncIterator[Named]:
    """Start a target answering its own name, on (host, port)."""
    runners: list[web.AppRunner] = []

    async def start(host: str, port: int) -> None:
        async def who(request: web.Request) -> web.Response:
            return web.Response(text=f"{host}:{port}")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", who)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)

    yield start
    for runner in runners:
        await runner.cleanup()


def _toml(dns: DnsServer, target: str, extra: str = "") -> str:
    return f"""
        [upstreams.app]
        targets = [{target}]
        dns_refresh = {REFRESH}
        nameservers = ["{dns.nameserver}"]
        {extra}

        [[routes]]
        name = "all"
        path = "/"
        upstream = "app"
    """


async def _who(client: aiohttp.ClientSession, gw: RunningGateway, n: int) -> set[str]:
    seen: set[str] = set()
    for _ in range(n):
        async with client.get(gw.url + "/") as resp:
            assert resp.status == 200
            seen.add(await resp.text())
    return seen


async def _refreshes(dns: DnsServer, n: int) -> None:
    """Wait for `n` more lookup rounds (an A and an AAAA query each)."""
    queries = len(dns.zone.queries)
    await wait_for(lambda: len(dns.zone.queries) >= queries + 2 * n, WAIT)


def _urls(gw: RunningGateway) -> list[str]:
    return [t.url for t in gw.gateway.runtime.targets_of(gw.gateway.config.upstreams["app"])]


async def test_dns_target_follows_the_records_and_keeps_state_of_those_that_stay(
    make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    dns: DnsServer,
    named: Named,
) -> None:
    port = free_port()
    await named("127.0.0.1", port)
    await named("127.0.0.2", port)
    dns.zone.set("users.test.", "A", "users.test. 60 IN A 127.0.0.1\nusers.test. 60 IN A 127.0.0.2")
    gw = await make_gateway(_toml(dns, f'{{ dns = "users.test:{port}" }}'))
    # Resolved before serving: both addresses are targets from the first request.
    assert _urls(gw) == [f"http://127.0.0.1:{port}", f"http://127.0.0.2:{port}"]
    assert await _who(client, gw, 4) == {f"127.0.0.1:{port}", f"127.0.0.2:{port}"}
    stays = gw.gateway.runtime.targets[("app", f"http://127.0.0.2:{port}")]
    stays.breaker.record_failure()  # state that must survive the refresh
    failures = stays.breaker.failures
    assert gw.admin_url is not None
    async with client.get(gw.admin_url + "/status") as resp:
        status = await resp.json()
    assert [t["url"] for t in status["upstreams"]["app"]["targets"]] == _urls(gw)

    dns.zone.set("users.test.", "A", "users.test. 60 IN A 127.0.0.2")
    await wait_for(lambda: len(_urls(gw)) == 1, WAIT)
    assert await _who(client, gw, 3) == {f"127.0.0.2:{port}"}
    assert gw.gateway.runtime.targets[("app", f"http://127.0.0.2:{port}")] is stays
    assert stays.breaker.failures == failures
    assert ("app", f"http://127.0.0.1:{port}") not in gw.gateway.runtime.targets
    async with client.get(gw.admin_url + "/metrics") as resp:
        metrics = await resp.text()
    assert f'target="http://127.0.0.2:{port}"' in metrics


async def test_failed_or_empty_lookups_keep_the_last_good_set_and_are_logged_once(
    make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    dns: DnsServer,
    named: Named,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from dnslib import RCODE  # type: ignore[import-untyped]

    caplog.set_level(logging.INFO, logger="gateway.discovery")
    port = free_port()
    await named("127.0.0.1", port)
    dns.zone.set("users.test.", "A", "users.test. 60 IN A 127.0.0.1")
    gw = await make_gateway(_toml(dns, f'{{ dns = "users.test:{port}" }}'))
    assert _urls(gw) == [f"http://127.0.0.1:{port}"]

    dns.zone.rcode = RCODE.SERVFAIL
    await _refreshes(dns, 3)
    assert _urls(gw) == [f"http://127.0.0.1:{port}"]
    assert await _who(client, gw, 2) == {f"127.0.0.1:{port}"}
    failed = [r for r in caplog.records if "keeping the last good set" in r.getMessage()]
    assert len(failed) == 1

    # Zero records (NOERROR, no answer), and only addresses that are no
    # target (0.0.0.0, multicast, broadcast): the set stays too.
    dns.zone.rcode = None
    for records in ("", "users.test. 60 IN A 0.0.0.0\nusers.test. 60 IN A 224.0.0.1"):
        dns.zone.set("users.test.", "A", records)
        await _refreshes(dns, 2)
        assert _urls(gw) == [f"http://127.0.0.1:{port}"]
    assert await _who(client, gw, 2) == {f"127.0.0.1:{port}"}


async def test_srv_target_uses_the_best_priority_with_its_ports_and_weights(
    make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    dns: DnsServer,
    named: Named,
) -> None:
    first, second, backup = free_port(), free_port(), free_port()
    for port in (first, second, backup):
        await named("127.0.0.1", port)
    dns.zone.set("a.test.", "A", "a.test. 2147483647 IN A 127.0.0.1")  # a TTL of 68 years
    dns.zone.set("b.test.", "A", "b.test. 60 IN A 127.0.0.1")
    dns.zone.set(
        "_http._tcp.users.test.",
        "SRV",
        f"_http._tcp.users.test. 60 IN SRV 10 3 {first} a.test.\n"
        f"_http._tcp.users.test. 60 IN SRV 10 1 {second} b.test.\n"
        f"_http._tcp.users.test. 60 IN SRV 20 1 {backup} b.test.\n"
        f"_http._tcp.users.test. 60 IN SRV 10 1 {backup} .\n"  # "no service"
        "_http._tcp.users.test. 60 IN SRV 10 1 0 b.test.\n",  # port 0
    )
    gw = await make_gateway(
        _toml(dns, '{ srv = "_http._tcp.users.test" }', 'balancer = "weighted"')
    )
    pool = gw.gateway.box.snapshot.pools["app"]  # type: ignore[union-attr]
    assert {(t.url, t.weight) for t in pool.targets} == {
        (f"http://127.0.0.1:{first}", 3),
        (f"http://127.0.0.1:{second}", 1),
    }
    assert await _who(client, gw, 8) == {f"127.0.0.1:{first}", f"127.0.0.1:{second}"}
    # The best priority gone: the backup takes over, despite the huge TTL seen.
    dns.zone.set(
        "_http._tcp.users.test.", "SRV", f"_http._tcp.users.test. 60 IN SRV 20 1 {backup} b.test."
    )
    await wait_for(lambda: _urls(gw) == [f"http://127.0.0.1:{backup}"], WAIT)
    assert await _who(client, gw, 2) == {f"127.0.0.1:{backup}"}


async def test_a_reload_keeps_the_resolved_set_and_removing_the_entry_drops_it(
    make_gateway: GatewayFactory,
    dns: DnsServer,
    named: Named,
) -> None:
    from gateway.core.config import parse

    port = free_port()
    await named("127.0.0.1", port)
    dns.zone.set("users.test.", "A", "users.test. 60 IN A 127.0.0.1")
    text = _toml(dns, f'{{ dns = "users.test:{port}" }}')
    gw = await make_gateway(text)
    server = '[server]\nlisten = ["127.0.0.1:0"]\nadmin = ""\n'
    gw.gateway.apply(
        gw.gateway.prepare(parse(server + text.replace("dns_refresh = 0.2", "dns_refresh = 0.3")))
    )
    assert _urls(gw) == [f"http://127.0.0.1:{port}"]
    static = parse(
        server
        + text.replace(f'{{ dns = "users.test:{port}" }}', f'"http://127.0.0.1:{port}"')
        .replace(f"dns_refresh = {REFRESH}", "")
        .replace(f'nameservers = ["{dns.nameserver}"]', "")
    )
    gw.gateway.apply(gw.gateway.prepare(static))
    assert gw.gateway.runtime.discovered == {}
    await asyncio.sleep(REFRESH * 2)
    assert _urls(gw) == [f"http://127.0.0.1:{port}"]


async def test_start_up_without_an_answer_serves_503_until_dns_answers(
    make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    dns: DnsServer,
    named: Named,
) -> None:
    from dnslib import RCODE

    port = free_port()
    await named("127.0.0.1", port)
    dns.zone.set("users.test.", "A", "users.test. 60 IN A 127.0.0.1")
    dns.zone.rcode = RCODE.SERVFAIL
    async with asyncio.timeout(WAIT):
        gw = await make_gateway(_toml(dns, f'{{ dns = "users.test:{port}" }}'))
    async with client.get(gw.url + "/") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]
    dns.zone.rcode = None
    await wait_for(lambda: _urls(gw) == [f"http://127.0.0.1:{port}"], WAIT)
    assert await _who(client, gw, 1) == {f"127.0.0.1:{port}"}
