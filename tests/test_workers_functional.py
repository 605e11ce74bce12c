"""workers = N: the main process and its workers, as real processes.

The gateway runs as a subprocess with `$NOTIFY_SOCKET` on a socket the test
owns (tests/gateway_process.py); readiness is READY=1, never a sleep. Each
request opens a new connection (`Connection: close`), so the kernel spreads
them over the workers' accept queues.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import UpstreamFactory, wait_for
from tests.gateway_process import (
    free_port,
    kill,
    metric_value,
    run_gateway,
    start_gateway,
    upstream_url,
)

WAIT = 15.0


def _toml(upstream: str, extra_route: str = "", extra_upstream: str = "", workers: int = 2) -> str:
    return f"""
        [server]
        listen = ["127.0.0.1:0"]
        admin = "127.0.0.1:0"
        workers = {workers}
        access_log = "off"
        drain_timeout = 5.0

        [upstreams.app]
        targets = ["{upstream}"]
        {extra_upstream}

        [[routes]]
        name = "all"
        path = "/"
        upstream = "app"
        {extra_route}
    """


class Counting:
    def __init__(self) -> None:
        self.probes = 0
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        async def answer(request: web.Request) -> web.Response:
            if request.path == "/healthz":
                self.probes += 1
            elif request.path == "/slow":
                async with asyncio.timeout(WAIT):
                    await self.release.wait()
            return web.Response(text=f"ok {request.path}")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        return app


async def _get(client: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with client.get(url, headers={"Connection": "close"}) as resp:
        return resp.status, await resp.text()


async def _status(client: aiohttp.ClientSession, admin: str) -> dict[str, object]:
    async with client.get(admin + "/status") as resp:
        document: dict[str, object] = await resp.json()
        return document


async def test_workers_serve_and_the_admin_answers_for_the_whole_gateway(
    tmp_path: Path, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    upstream = await start_upstream(Counting().app())
    async with run_gateway(tmp_path, _toml(upstream_url(upstream))) as gw:
        assert gw.ready.startswith("READY=1")
        status = await _status(client, gw.admin_url)
        workers = status["workers"]
        assert isinstance(workers, list)
        assert len(workers) == 2
        pids = {w["pid"] for w in workers}
        assert gw.pid not in pids
        assert all(w["restarts"] == 0 for w in workers)
        for _ in range(20):
            assert await _get(client, gw.url + "/x") == (200, "ok /x")
        async with client.get(gw.admin_url + "/metrics") as resp:
            text = await resp.text()
        # Summed over the workers: every request counted once.
        assert (
            metric_value(text, "gateway_requests_total", route="all", method="GET", code="200")
            == 20.0
        )
        # READY=1 came once, from the main process, after every worker served.
        assert [m for m in gw.notify.states() if m.startswith("READY=1")] == [gw.ready]


async def test_a_rate_limit_holds_across_workers_exactly(
    tmp_path: Path, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    upstream = await start_upstream(Counting().app())
    limit = """
        [routes.rate_limit]
        rate = 0.01
        burst = 7
        key = "route"
    """
    async with run_gateway(tmp_path, _toml(upstream_url(upstream), limit, workers=3)) as gw:
        statuses = await asyncio.gather(*(_get(client, gw.url + "/") for _ in range(30)))
        codes = sorted(code for code, _ in statuses)
        # 3 workers do not make it 21.
        assert codes.count(200) == 7
        assert codes.count(429) == 23


async def test_health_probes_run_once_per_interval_and_every_worker_sees_them(
    tmp_path: Path, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    counting = Counting()
    upstream = await start_upstream(counting.app())
    health = """
        panic_threshold = 0

        [upstreams.app.health]
        path = "/healthz"
        interval = 0.25
        unhealthy_threshold = 1
        healthy_threshold = 1
    """
    url = upstream_url(upstream)
    toml = _toml(url, extra_upstream=health, workers=3)
    async with run_gateway(tmp_path, toml) as gw:
        before = counting.probes
        await asyncio.sleep(1.5)
        probes = counting.probes - before
        # One probe per interval (about 6), not one per worker (18).
        assert 3 <= probes <= 9, probes
        # The target fails its probe: every worker takes it out (503 on every
        # connection), though only the main process probed.
        await upstream.close()
        async with asyncio.timeout(WAIT):
            while True:
                async with client.get(gw.admin_url + "/metrics") as resp:
                    text = await resp.text()
                if (
                    metric_value(
                        text,
                        "gateway_target_healthy",
                        upstream="app",
                        target=url,
                    )
                    == 0.0
                ):
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # the push to the workers (every 0.1 s)
        for _ in range(9):
            status, body = await _get(client, gw.url + "/")
            assert status == 503, body


async def test_a_worker_that_dies_is_restarted_and_logged(
    tmp_path: Path, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    upstream = await start_upstream(Counting().app())
    async with run_gateway(tmp_path, _toml(upstream_url(upstream))) as gw:
        workers = (await _status(client, gw.admin_url))["workers"]
        assert isinstance(workers, list)
        victim = workers[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        async with asyncio.timeout(WAIT):
            while True:
                workers = (await _status(client, gw.admin_url))["workers"]
                assert isinstance(workers, list)
                if workers[0]["restarts"] == 1 and workers[0]["pid"] != victim:
                    break
                await asyncio.sleep(0.05)
        assert f"worker 0 (pid {victim}) was killed by SIGKILL; restarting in 0.5s" in gw.stderr()
        # The new worker says it serves (the log, not a sleep).
        await wait_for(lambda: "serving on" in gw.stderr().rsplit("restarting", 1)[1], WAIT)
        for _ in range(10):
            assert (await _get(client, gw.url + "/"))[0] == 200


async def test_sighup_reloads_every_worker_or_none(
    tmp_path: Path, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    upstream = await start_upstream(Counting().app())
    url = upstream_url(upstream)
    async with run_gateway(tmp_path, _toml(url)) as gw:
        assert (await _get(client, gw.url + "/new/x"))[1] == "ok /new/x"
        moved = _toml(url).replace('path = "/"', 'path = "/new"\n        strip_prefix = true')
        await gw.reload(moved)
        for _ in range(10):
            assert await _get(client, gw.url + "/new/x") == (200, "ok /x")
            assert (await _get(client, gw.url + "/other"))[0] == 404
        # Invalid: logged, every worker keeps the last good config.
        await gw.reload(moved.replace('upstream = "app"', 'upstream = "appp"'))
        assert 'unknown upstream "appp"' in gw.stderr()
        for _ in range(10):
            assert await _get(client, gw.url + "/new/x") == (200, "ok /x")
        async with client.get(gw.admin_url + "/metrics") as resp:
            text = await resp.text()
        assert metric_value(text, "gateway_config_reloads_total", result="success") == 1.0
        assert metric_value(text, "gateway_config_reloads_total", result="failure") == 1.0


async def test_sigterm_drains_every_worker_and_exits_0(
    tmp_path: Path, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    counting = Counting()
    upstream = await start_upstream(counting.app())
    gw = await start_gateway(tmp_path, _toml(upstream_url(upstream)))
    try:
        workers = (await _status(client, gw.admin_url))["workers"]
        assert isinstance(workers, list)
        slow = asyncio.ensure_future(_get(client, gw.url + "/slow"))
        await asyncio.sleep(0.3)
        gw.send(signal.SIGTERM)
        await gw.notify.next("STOPPING=1", WAIT)
        counting.release.set()
        assert await slow == (200, "ok /slow")
        assert await gw.wait(WAIT) == 0
        for worker in workers:
            with pytest.raises(ProcessLookupError):
                os.kill(worker["pid"], 0)
        assert "Traceback" not in gw.stderr()
    finally:
        await kill(gw)


def test_workers_key_is_validated() -> None:
    from gateway.core.config import ConfigError, parse

    for value, message in (
        ("-1", "must be >= 0"),
        ("257", "must be <= 256"),
        ('"2"', "Expected `int`"),
    ):
        with pytest.raises(ConfigError) as info:
            parse(f"[server]\nworkers = {value}\n")
        assert message in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse("[server]\nworker = 2\n")
    assert 'did you mean "workers"' in str(info.value)
    assert parse("[server]\nworkers = 0\n").server.workers == 0


async def test_workers_serve_on_sockets_from_the_service_manager(
    tmp_path: Path, start_upstream: UpstreamFactory
) -> None:
    import shutil
    import sys

    from tests.gateway_process import free_port, spawn_gateway

    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    upstream = await start_upstream(Counting().app())
    http_port, admin_port = free_port(), free_port()
    gw = await spawn_gateway(
        tmp_path,
        _toml(upstream_url(upstream)),
        argv=[
            activate,
            f"--listen=127.0.0.1:{http_port}",
            f"--listen=127.0.0.1:{admin_port}",
            "--fdname=http:admin",
            "-E",
            "NOTIFY_SOCKET",
            "-E",
            "PYTHONPATH",
            "-E",
            "PYTHONUNBUFFERED",
            sys.executable,
            "-m",
            "gateway",
            "run",
            "-c",
            "{config}",
        ],
    )
    try:
        # systemd-socket-activate starts the gateway on the first connection.
        async with aiohttp.ClientSession() as client:
            async with asyncio.timeout(WAIT):
                while True:
                    try:
                        first = await _get(client, f"http://127.0.0.1:{http_port}/first")
                        break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.02)
            assert first == (200, "ok /first")
            await gw.until_ready()
            assert gw.url == f"http://127.0.0.1:{http_port}"
            assert gw.admin_url == f"http://127.0.0.1:{admin_port}"
            status = await _status(client, gw.admin_url)
            assert isinstance(status["workers"], list)
            assert len(status["workers"]) == 2
            for _ in range(6):
                assert (await _get(client, gw.url + "/again"))[0] == 200
        gw.send(signal.SIGTERM)
        assert await gw.wait(WAIT) == 0
    finally:
        await kill(gw)


async def test_workers_do_not_outlive_a_main_process_killed_outright(
    tmp_path: Path, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    upstream = await start_upstream(Counting().app())
    gw = await start_gateway(tmp_path, _toml(upstream_url(upstream)))
    try:
        workers = (await _status(client, gw.admin_url))["workers"]
        assert isinstance(workers, list)
        pids = [int(w["pid"]) for w in workers]
    finally:
        await kill(gw)  # SIGKILL: no drain, no goodbye to the workers

    def gone(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as file:
                return file.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie
        except FileNotFoundError:
            return True

    await wait_for(lambda: all(gone(pid) for pid in pids), WAIT)


# -- the operator tools under workers -------------------------------------------------

_TOKEN = "s3cret-admin-token"


def _admin_toml(upstream: str, dead: int, extra: str = "") -> str:
    # Token-guarded; "flaky" opens its breaker at the first failure, for
    # long enough that only a reset closes it within the test.
    server = 'admin_token_env = "GW_TEST_ADMIN_TOKEN"'
    flaky = f"""
        [upstreams.flaky]
        targets = ["http://127.0.0.1:{dead}"]
        panic_threshold = 0.0
        [upstreams.flaky.breaker]
        failures = 1
        cooldown = 300.0
        max_cooldown = 300.0
    """
    routes = f"""
        [[routes]]
        name = "broken"
        path = "/broken"
        upstream = "flaky"
        {extra}
    """
    return (
        _toml(upstream)
        .replace("workers = 2", f"workers = 2\n        {server}")
        .replace(
            '[upstreams.app]\n        targets = ["' + upstream + '"]',
            '[upstreams.app]\n        targets = ["' + upstream + '"]\n' + flaky,
        )
        + routes
    )


async def _post(
    client: aiohttp.ClientSession, url: str, token: str | None = _TOKEN
) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with client.post(url, headers=headers) as resp:
        document: dict[str, object] = await resp.json()
        return resp.status, document


async def _stats(client: aiohttp.ClientSession, admin: str) -> dict[str, object]:
    async with client.get(admin + "/stats") as resp:
        assert resp.status == 200
        document: dict[str, object] = await resp.json()
        return document


async def test_the_admin_tools_answer_for_every_worker(
    tmp_path: Path, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    upstream = upstream_url(await start_upstream(Counting().app()))
    toml = _admin_toml(upstream, free_port())
    env = {"GW_TEST_ADMIN_TOKEN": _TOKEN}
    async with run_gateway(tmp_path, toml, env=env) as gw:
        admin = gw.admin_url
        # /stats: the route's minute summed over both workers. Concurrent
        # connections, so that both workers' accept loops take some.
        answers = await asyncio.gather(*(_get(client, gw.url + "/x") for _ in range(24)))
        assert all(answer == (200, "ok /x") for answer in answers)
        stats = await _stats(client, admin)
        routes = stats["routes"]
        assert isinstance(routes, dict)
        assert routes["all"]["requests"] == 24
        assert routes["all"]["errors"] == 0
        assert routes["all"]["p50_ms"] is not None
        assert sum(routes["all"]["series"]["requests"]) == 24
        assert stats["admin_token_required"] is True
        assert stats["cache_purge"] is False
        async with client.get(admin + "/") as resp:
            assert resp.status == 200
            assert "text/html" in resp.headers["Content-Type"]
        # The token guards every POST, as with one process.
        for token in (None, "wrong", _TOKEN + "x"):
            status, body = await _post(client, admin + "/breakers/reset?upstream=flaky", token)
            assert (status, body["error"]) == (401, "unauthorized")
        # Breakers are per worker: open them in both, one reset closes every one.
        # Which worker accepts a connection is the kernel's choice: a burst may
        # all go to one (it accepts in a loop), so the connections of a round
        # come one at a time, each a fresh race between the two workers.
        resets: list[object] = []
        for _ in range(20):
            for _ in range(8):
                await _get(client, gw.url + "/broken")
                await asyncio.sleep(0.01)
            status, body = await _post(client, admin + "/breakers/reset?upstream=flaky")
            assert status == 200
            resets.append(body["reset"])
            if body["reset"] == 2:
                break
        assert resets[-1] == 2, resets
        status, body = await _post(client, admin + "/breakers/reset?upstream=flaky")
        assert (status, body) == (200, {"reset": 0})
        status, body = await _post(client, admin + "/breakers/reset?upstream=nope")
        assert (status, body["error"]) == (404, "not_found")
        status, body = await _post(client, admin + "/cache/purge?route=all")
        assert (status, body["error"]) == (409, "no_cache")
        # POST /reload: the SIGHUP path; a good file reaches every worker.
        added = (
            '[[routes]]\n        name = "added"\n        path = "/added"\n        upstream = "app"'
        )
        gw.write_config(toml + "\n        " + added)
        status, body = await _post(client, admin + "/reload")
        assert status == 200, body
        assert body["ok"] is True
        assert "routes added: added" in str(body["changes"])
        answers = await asyncio.gather(*(_get(client, gw.url + "/added") for _ in range(16)))
        assert all(answer == (200, "ok /added") for answer in answers)
        stats = await _stats(client, admin)
        assert stats["routes"]["added"]["requests"] == 16  # type: ignore[index]
        assert stats["config"]["last_reload"]["ok"] is True  # type: ignore[index]
        # A bad file: 422 with its errors, and no process takes it.
        gw.write_config(toml.replace('upstream = "app"', 'upstream = "missing"', 1))
        status, body = await _post(client, admin + "/reload")
        assert status == 422, body
        assert body["ok"] is False
        errors = body["errors"]
        assert isinstance(errors, list)
        assert errors
        assert any("missing" in str(e) for e in errors)
        answers = await asyncio.gather(*(_get(client, gw.url + "/added") for _ in range(8)))
        assert all(answer == (200, "ok /added") for answer in answers)
        assert await _get(client, gw.url + "/x") == (200, "ok /x")


async def test_a_cache_purge_reaches_every_workers_cache_and_cross_site_posts_are_refused(
    tmp_path: Path, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    upstream = upstream_url(await start_upstream(Counting().app()))
    toml = _toml(upstream, "[routes.cache]\n        ttl = 60.0") + "\n        [cache]\n"
    async with run_gateway(tmp_path, toml) as gw:
        paths = [f"/c/{n}" for n in range(16)]
        answers = await asyncio.gather(*(_get(client, gw.url + p) for p in paths))
        assert answers == [(200, f"ok {p}") for p in paths]
        stats = await _stats(client, gw.admin_url)
        assert stats["cache_purge"] is True
        # Each worker keeps its own store; /stats shows their sum.
        assert stats["cache"]["entries"] == 16  # type: ignore[index]
        status, body = await _post(client, gw.admin_url + "/cache/purge?route=all&path=/c/")
        assert (status, body) == (200, {"purged": 16})
        stats = await _stats(client, gw.admin_url)
        assert stats["cache"]["entries"] == 0  # type: ignore[index]
        status, body = await _post(client, gw.admin_url + "/cache/purge?route=nope")
        assert (status, body["error"]) == (404, "not_found")
        # No token configured: a browser's POST for another site's page is
        # refused, as with one process (CSRF).
        url = gw.admin_url + "/reload"
        for hostile in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            async with client.post(url, headers=hostile) as resp:
                assert resp.status == 403
                assert (await resp.json())["error"] == "cross_site"
