"""SIGHUP reloads of the real gateway process, under load and otherwise."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.core.config import load, parse
from gateway.edges.reload import describe_changes
from gateway.server import Gateway
from gateway.state.log import AccessLog
from tests.conftest import UpstreamFactory, wait_for
from tests.gateway_process import (
    GatewayProcess,
    assert_clean_exit,
    config_text,
    metric_value,
    named_app,
    run_gateway,
    upstream_url,
)

CHUNK = 256 * 1024
CHUNKS = 800  # 200 MiB
TIMEOUT = aiohttp.ClientTimeout(total=60)


class SlowDownload:
    """An upstream serving one 200 MiB body, paced, that stops at half way
    until `release` is set: the test decides how long the stream spans."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.digest = hashlib.sha256()

    async def handler(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = CHUNK * CHUNKS
        await response.prepare(request)
        block = bytearray(os.urandom(CHUNK))
        for i in range(CHUNKS):
            if i == CHUNKS // 2:
                await self.release.wait()
            block[:8] = i.to_bytes(8, "big")
            data = bytes(block)
            self.digest.update(data)
            await response.write(data)
            self.started.set()
            await asyncio.sleep(0.001)
        await response.write_eof()
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/big", self.handler)
        return app


def load_config(
    a: list[str], b: str, dl: str | None, routes: dict[str, tuple[str, str]], *, extra: str = ""
) -> str:
    """Upstreams a (targets `a`), b, dl (unless None); `routes` is name -> (path, upstream)."""
    targets = ", ".join(f'"{t}"' for t in a)
    text = f"""
        [server]
        listen = ["127.0.0.1:0"]
        admin = "127.0.0.1:0"
        drain_timeout = 5.0

        [upstreams.a]
        targets = [{targets}]

        [upstreams.b]
        targets = ["{b}"]
    """
    if dl is not None:
        text += f"""
        [upstreams.dl]
        targets = ["{dl}"]
        """
    for name, (path, upstream) in routes.items():
        text += f"""
        [[routes]]
        name = "{name}"
        path = "{path}"
        upstream = "{upstream}"
        {extra if name == "other" else ""}
        """
    return text


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


async def metrics(session: aiohttp.ClientSession, gw: GatewayProcess) -> str:
    async with session.get(gw.admin_url + "/metrics") as response:
        assert response.status == 200
        return await response.text()


async def test_reloads_under_load_fail_no_request_and_keep_a_removed_upstreams_stream(
    tmp_path: Path, start_upstream: UpstreamFactory
) -> None:
    a1 = upstream_url(await start_upstream(named_app("A1")))
    a2 = upstream_url(await start_upstream(named_app("A2")))
    b = upstream_url(await start_upstream(named_app("B")))
    slow = SlowDownload()
    dl_server = await start_upstream(slow.app())
    dl = upstream_url(dl_server)
    base = {"small": ("/small", "a"), "other": ("/other", "b")}
    configs = [
        # 1: a target and a route added
        load_config([a1, a2], b, dl, {**base, "download": ("/big", "dl"), "new1": ("/new1", "b")}),
        # 2: a target removed, a route changed (other now goes to a), a route added
        load_config(
            [a2],
            b,
            dl,
            {
                "small": ("/small", "a"),
                "other": ("/other", "a"),
                "download": ("/big", "dl"),
                "new1": ("/new1", "b"),
                "new2": ("/new2", "a"),
            },
        ),
        # 3: the running download's route and upstream removed, new1 removed
        load_config([a2], b, None, {**base, "new2": ("/new2", "a"), "new3": ("/new3", "b")}),
        # 4: a target back, a route changed in its limits only
        load_config(
            [a1, a2], b, None, {**base, "new3": ("/new3", "b")}, extra="read_timeout = 30.0"
        ),
    ]
    # After each reload: (path, expected status, expected first word of the body).
    checks = [
        [("/new1", 200, "B")],
        [("/new2", 200, "A2"), ("/other", 200, "A2")],
        [("/new3", 200, "B"), ("/new1", 404, ""), ("/big", 404, "")],
        [("/new2", 404, ""), ("/other", 200, "B")],
    ]
    initial = load_config([a1], b, dl, {**base, "download": ("/big", "dl")})

    failures: list[str] = []
    answered = 0
    stop = asyncio.Event()

    async def traffic(session: aiohttp.ClientSession, worker: int) -> None:
        nonlocal answered
        for i in range(20_000):  # bounded; stops long before
            if stop.is_set():
                return
            path = "/small" if (i + worker) % 2 else "/other"
            try:
                status, body = await get(session, url + path)
            except (aiohttp.ClientError, OSError) as exc:
                failures.append(f"{path}: {exc!r}")
                continue
            if status != 200 or body.split()[0] not in {"A1", "A2", "B"}:
                failures.append(f"{path}: {status} {body[:100]}")
            answered += 1

    async def download(session: aiohttp.ClientSession) -> tuple[int, str]:
        digest = hashlib.sha256()
        size = 0
        async with session.get(url + "/big") as response:
            assert response.status == 200
            async for chunk in response.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

    async with (
        run_gateway(tmp_path, initial) as gw,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        url = gw.url
        downloading = asyncio.create_task(download(session))
        workers = [asyncio.create_task(traffic(session, w)) for w in range(6)]
        try:
            async with asyncio.timeout(10):
                await slow.started.wait()
            for config, expected in zip(configs, checks, strict=True):
                await gw.reload(config)
                for path, status, word in expected:
                    got_status, body = await get(session, url + path)
                    assert (got_status, body.split()[0] if word else "") == (status, word), body
            # The stream began on an upstream that is gone from the config.
            assert not downloading.done()
            slow.release.set()
            size, digest = await asyncio.wait_for(downloading, 30)
        finally:
            slow.release.set()
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
        assert failures == []
        assert answered > 50
        assert size == CHUNK * CHUNKS
        assert digest == slow.digest.hexdigest()
        # The removed upstream's client session closed once the stream ended:
        # its pooled connection to the target is gone.
        assert dl_server.runner is not None
        dl_web_server = dl_server.runner.server
        assert dl_web_server is not None
        await wait_for(lambda: not dl_web_server.connections)
        text = await metrics(session, gw)
        gw.send(signal.SIGTERM)
        assert await gw.wait() == 0
    assert_clean_exit(gw.stderr())
    assert metric_value(text, "gateway_config_reloads_total", result="success") == 4
    assert metric_value(text, "gateway_config_reloads_total", result="failure") == 0
    summaries = reload_summaries(gw)
    assert summaries[0] == f"routes added: new1; targets added: a:{a2}"
    assert summaries[1] == (f"routes added: new2; routes changed: other; targets removed: a:{a1}")
    assert summaries[2] == (
        "routes added: new3; routes removed: download, new1; routes changed: other; "
        "upstreams removed: dl"
    )
    assert summaries[3] == f"routes removed: new2; routes changed: other; targets added: a:{a1}"


BROKEN = """
    [server]
    listen = ["127.0.0.1:0"]
    admin = "127.0.0.1:0"
    drain_timeout = "soon"

    [upstreams.a]
    balancer = "random"
    targets = ["http://127.0.0.1:9"]

    [[routes]]
    name = "small"
    path = "/small"
    upstream = "nope"
"""


def one_route(target: str, name: str = "small", path: str = "/small") -> str:
    return f"""
        [upstreams.a]
        targets = ["{target}"]

        [[routes]]
        name = "{name}"
        path = "{path}"
        upstream = "a"
    """


async def test_an_invalid_reload_logs_every_error_and_the_old_config_keeps_serving(
    tmp_path: Path, start_upstream: UpstreamFactory
) -> None:
    a = upstream_url(await start_upstream(named_app("A")))
    async with (
        run_gateway(tmp_path, one_route(a)) as gw,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        reloading = await gw.reload(BROKEN)
        lines = reloading.split("\n")
        assert lines[0] == "RELOADING=1"
        usec = next(
            int(v) for k, _, v in (x.partition("=") for x in lines) if k == "MONOTONIC_USEC"
        )
        assert before <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        # READY=1 followed (gw.reload waited for it) even though the reload failed.
        log = gw.stderr()
        assert "reload of" in log
        assert "rejected (3 error(s))" in log
        for key in ("server.drain_timeout", "upstreams.a.balancer", 'routes[0] ("small").upstream'):
            assert key in log
        assert await get(session, gw.url + "/small") == (200, "A /small")
        text = await metrics(session, gw)
        assert metric_value(text, "gateway_config_reloads_total", result="failure") == 1
        assert metric_value(text, "gateway_config_reloads_total", result="success") == 0

        # A deleted file is one more failure, and a fixed file then loads.
        gw.config_path.unlink()
        await gw.reload()
        assert "cannot read" in gw.stderr()
        await gw.reload(one_route(a, "fixed", "/fixed"))
        assert await get(session, gw.url + "/fixed") == (200, "A /fixed")
        assert (await get(session, gw.url + "/small"))[0] == 404
        text = await metrics(session, gw)
        assert metric_value(text, "gateway_config_reloads_total", result="failure") == 2
        assert metric_value(text, "gateway_config_reloads_total", result="success") == 1
    states = gw.notify.states()
    assert [s.split("\n")[0] for s in states] == ["READY=1"] + ["RELOADING=1", "READY=1"] * 3


async def test_sighups_in_quick_succession_coalesce_and_the_last_file_wins(
    tmp_path: Path, start_upstream: UpstreamFactory
) -> None:
    a = upstream_url(await start_upstream(named_app("A")))
    async with (
        run_gateway(tmp_path, one_route(a)) as gw,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        gw.write_config(one_route(a, "final", "/final"))
        for _ in range(5):
            gw.send(signal.SIGHUP)
        # At least one reload started after the last signal read the final file.
        async with asyncio.timeout(10):
            while (await get(session, gw.url + "/final"))[0] != 200:
                await gw.notify.next("READY=1")
        # A coalesced reload may still be running (or about to start): a
        # SIGTERM then ends it without its READY=1. Stop once every reload
        # begun has ended, twice 0.2 s apart (no pending one started between).
        async with asyncio.timeout(10):
            settled = 0
            while settled < 2:
                await asyncio.sleep(0.2)
                states = gw.notify.states()
                begun = sum(s.startswith("RELOADING=1") for s in states)
                ended = sum(s.startswith("READY=1") for s in states) - 1
                settled = settled + 1 if ended == begun else 0
        gw.send(signal.SIGTERM)
        assert await gw.wait() == 0
    assert_clean_exit(gw.stderr())
    reloads = [s for s in gw.notify.states() if s.startswith("RELOADING=1")]
    readies = [s for s in gw.notify.states() if s.startswith("READY=1")]
    assert 1 <= len(reloads) < 5
    assert len(readies) == len(reloads) + 1
    assert gw.stderr().count("reloaded ") == len(reloads)


class Flaky:
    """A target answering 503 (breaker food) and a health endpoint on cue."""

    def __init__(self) -> None:
        self.healthy = False
        self.probes = 0
        # Set by the second probe: probes of a target run one after another,
        # so by then the gateway has recorded the first one's verdict.
        self.judged = asyncio.Event()

    def app(self) -> web.Application:
        async def health(request: web.Request) -> web.Response:
            self.probes += 1
            if self.probes >= 2:
                self.judged.set()
            return web.Response(status=200 if self.healthy else 500)

        async def fail(request: web.Request) -> web.Response:
            return web.Response(status=503, text="down")

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_route("*", "/{tail:.*}", fail)
        return app


def state_config(a: str, flaky: str, sick: str, *, burst: int, failures: int, extra: str) -> str:
    return f"""
        [upstreams.a]
        targets = ["{a}"]

        [upstreams.flaky]
        targets = ["{flaky}"]
        panic_threshold = 0  # classic breaker: open means no traffic
        [upstreams.flaky.breaker]
        failures = {failures}
        cooldown = 600.0

        [upstreams.sick]
        targets = ["{sick}"]
        panic_threshold = 0
        [upstreams.sick.health]
        path = "/health"
        interval = 0.05
        timeout = 1.0
        unhealthy_threshold = 1
        healthy_threshold = 1000

        [[routes]]
        name = "limited"
        path = "/limited"
        upstream = "a"
        [routes.rate_limit]
        rate = 0.001
        burst = {burst}
        key = "route"

        [[routes]]
        name = "flaky"
        path = "/flaky"
        upstream = "flaky"

        [[routes]]
        name = "sick"
        path = "/sick"
        upstream = "sick"
        {extra}
    """


async def status_targets(
    session: aiohttp.ClientSession, gw: GatewayProcess
) -> dict[str, dict[str, Any]]:
    """/status: the first target of each upstream, by upstream name."""
    async with session.get(gw.admin_url + "/status") as response:
        doc = json.loads(await response.text())
    return {name: up["targets"][0] for name, up in doc["upstreams"].items()}


def reload_summaries(gw: GatewayProcess) -> list[str]:
    """What each successful reload logged it changed."""
    return [
        line.split(": ", 2)[2]
        for line in gw.stderr().splitlines()
        if "gateway.reload: reloaded " in line
    ]


async def test_bucket_breaker_and_health_state_survive_an_unrelated_reload(
    tmp_path: Path, start_upstream: UpstreamFactory
) -> None:
    a = upstream_url(await start_upstream(named_app("A")))
    flaky = upstream_url(await start_upstream(Flaky().app()))
    sick_app = Flaky()
    sick = upstream_url(await start_upstream(sick_app.app()))
    extra_route = """
        [[routes]]
        name = "extra"
        path = "/extra"
        upstream = "a"
    """
    first = state_config(a, flaky, sick, burst=2, failures=1, extra="")
    async with (
        run_gateway(tmp_path, first) as gw,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        # Drain the bucket, open the breaker, let the health check fail once.
        assert [(await get(session, gw.url + "/limited"))[0] for _ in range(3)] == [200, 200, 429]
        assert (await get(session, gw.url + "/flaky")) == (503, "down")
        status, body = await get(session, gw.url + "/flaky")
        assert (status, json.loads(body)["error"]) == (503, "no_healthy_target")
        async with asyncio.timeout(5):
            await sick_app.judged.wait()
        assert (await status_targets(session, gw))["sick"]["healthy"] is False
        # From now on the probes pass, but it takes 1000 in a row to come back.
        sick_app.healthy = True

        await gw.reload(state_config(a, flaky, sick, burst=2, failures=1, extra=extra_route))
        assert reload_summaries(gw) == ["routes added: extra"]
        targets = await status_targets(session, gw)
        assert targets["flaky"]["breaker"] == "open"
        assert targets["sick"]["healthy"] is False
        assert (await get(session, gw.url + "/limited"))[0] == 429
        status, body = await get(session, gw.url + "/flaky")
        assert (status, json.loads(body)["error"]) == (503, "no_healthy_target")
        assert await get(session, gw.url + "/extra") == (200, "A /extra")

        # Changed routes and targets start afresh: a new bucket, a new breaker.
        await gw.reload(state_config(a, flaky, sick, burst=3, failures=2, extra=""))
        assert reload_summaries(gw)[1] == (
            "routes removed: extra; routes changed: limited; upstreams changed: flaky"
        )
        assert (await get(session, gw.url + "/limited"))[0] == 200
        assert (await status_targets(session, gw))["flaky"]["breaker"] == "closed"
        text = await metrics(session, gw)
        assert metric_value(text, "gateway_config_reloads_total", result="success") == 2


def test_describe_changes_names_what_changed_and_ignores_moves() -> None:
    base = """
        [upstreams.a]
        targets = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
        [[routes]]
        name = "one"
        path = "/one"
        upstream = "a"
        [[routes]]
        name = "two"
        path = "/two"
        upstream = "a"
    """
    old = parse(config_text(base))
    assert describe_changes(old, old) == "no changes"
    # Routes swapped in the file, a weight changed, a server setting changed.
    moved = """
        [server]
        listen = ["127.0.0.1:0"]
        admin = "127.0.0.1:0"
        access_log = "text"
        [upstreams.a]
        balancer = "weighted"
        targets = ["http://127.0.0.1:1", { url = "http://127.0.0.1:2", weight = 5 }]
        [[routes]]
        name = "two"
        path = "/two"
        upstream = "a"
        [[routes]]
        name = "one"
        path = "/one"
        upstream = "a"
    """
    assert describe_changes(old, parse(config_text(moved))) == (
        "upstreams changed: a; targets changed: a:http://127.0.0.1:2; server settings changed"
    )


def many_routes(upstream: str, prefixes: int, extra_route: str = "") -> str:
    """The large-table mix: `prefixes` prefix routes, a tenth as many host routes
    and as many regex routes, all to one upstream."""
    parts = [f'[upstreams.a]\ntargets = ["{upstream}"]\n']
    parts += [
        f'[[routes]]\nname = "svc{i}"\npath = "/svc{i}"\nupstream = "a"\nstrip_prefix = true\n'
        for i in range(prefixes)
    ]
    parts += [
        f'[[routes]]\nname = "host{i}"\nhost = "h{i}.example.com"\npath = "/"\nupstream = "a"\n'
        for i in range(prefixes // 10)
    ]
    parts += [
        f'[[routes]]\nname = "re{i}"\npath_regex = "^/re{i}/[0-9]+$"\nupstream = "a"\n'
        for i in range(prefixes // 10)
    ]
    return "\n".join(parts) + extra_route


async def test_twelve_thousand_routes_start_fast_and_a_reload_never_stalls_requests(
    tmp_path: Path, start_upstream: UpstreamFactory
) -> None:
    # Generous bounds for a loaded CI machine; the table built on the event
    # loop took 9 s to start and stalled every request for 9 s on a reload.
    a = upstream_url(await start_upstream(named_app("A")))
    began = time.monotonic()
    async with (
        run_gateway(tmp_path, many_routes(a, 10_000)) as gw,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        assert time.monotonic() - began < 5.0
        assert await get(session, gw.url + "/svc0/x") == (200, "A /x")
        assert await get(session, gw.url + "/re999/12") == (200, "A /re999/12")

        latencies: list[float] = []
        stop = asyncio.Event()

        async def traffic() -> None:
            for _ in range(100_000):  # bounded; ends when `stop` is set
                if stop.is_set():
                    return
                sent = time.monotonic()
                assert await get(session, gw.url + "/svc9999/y") == (200, "A /y")
                latencies.append(time.monotonic() - sent)

        task = asyncio.create_task(traffic())
        try:
            await asyncio.sleep(0.3)
            extra = '\n[[routes]]\nname = "added"\npath = "/added"\nupstream = "a"\n'
            await gw.reload(many_routes(a, 10_000, extra), within=30.0)
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30.0)
        assert len(latencies) > 10
        assert max(latencies) < 0.2, max(latencies)
        assert reload_summaries(gw) == ["routes added: added"]
        assert await get(session, gw.url + "/added") == (200, "A /added")


async def test_a_reload_frees_the_replaced_snapshot_in_a_worker_thread(tmp_path: Path) -> None:
    # A large snapshot freed by its last reference on the loop is one long
    # stall; the reloader hands it to a worker thread to free piece by piece.
    def config_text(first: str) -> str:
        return (
            '[server]\nlisten = ["127.0.0.1:0"]\naccess_log = "off"\n'
            '[upstreams.a]\ntargets = ["http://127.0.0.1:9"]\n'
            + first
            + '[[routes]]\nname = "r"\npath = "/r"\nupstream = "a"\n'
        )

    path = tmp_path / "gateway.toml"
    path.write_text(config_text(""))
    config = load(str(path))
    gateway = Gateway(config, environ={}, access_log=AccessLog("off", stream=io.StringIO()))
    await gateway.start()
    try:
        assert gateway.box is not None
        assert gateway.reloader is not None
        freed_in: list[int] = []
        old = weakref.ref(gateway.box.snapshot, lambda _: freed_in.append(threading.get_ident()))
        path.write_text(config_text('[[routes]]\nname = "n"\npath = "/n"\nupstream = "a"\n'))
        async with asyncio.timeout(10):
            assert await gateway.reloader.reload_once()
        assert old() is None  # freed, not kept (no cycle, no leftover reference)
        assert freed_in
        assert freed_in[0] != threading.get_ident()
        assert [r.name for r in gateway.box.snapshot.config.routes] == ["n", "r"]
    finally:
        await gateway.close()
