"""The admin dashboard in a real browser: headless Chromium driven by selenium.

The page is loaded from the real admin listener of an in-process gateway
serving real upstreams; traffic runs through the proxy listener meanwhile.
The browser must show a route's request rate rise (the page's own script
polling /stats), close an open breaker with its Reset button, and log no
console error. Skipped only when Chromium is not installed (CI installs it,
see .ci/run); selenium comes with the test extra.

Every browser call is blocking, so each runs in a thread (`asyncio.to_thread`)
while the gateway keeps serving on the test's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import GatewayFactory, UpstreamFactory
from tests.gateway_process import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium (Debian: chromium, chromium-driver) is not installed",
)

T = TypeVar("T")
WITHIN = 30.0  # seconds for anything the page must show (it polls every 2 s)


def _hello() -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(argument)
    assert CHROMIUM is not None
    assert CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = await asyncio.to_thread(
        webdriver.Chrome, options=options, service=Service(CHROMEDRIVER)
    )
    driver.set_page_load_timeout(WITHIN)
    try:
        yield driver
    finally:
        await asyncio.to_thread(driver.quit)


async def _until(probe: Callable[[], T | None], what: str, within: float = WITHIN) -> T:
    """Run `probe` (blocking, in a thread) until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        value = await asyncio.to_thread(probe)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed {what} within {within}s")
        await asyncio.sleep(0.25)


def _cell(driver: Any, css: str) -> str | None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return str(driver.find_element("css selector", css).text)
    except (NoSuchElementException, StaleElementReferenceException):
        return None


def _rising(value: str | None) -> str | None:
    return value if value not in (None, "0.0", "\u2013") else None


def _console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


async def _traffic(url: str, stop: asyncio.Event) -> int:
    sent = 0
    async with aiohttp.ClientSession() as session:
        for _ in range(100_000):  # bounded; `stop` ends it long before
            if stop.is_set():
                break
            async with session.get(url) as response:
                await response.read()
            sent += 1
            await asyncio.sleep(0.01)
    return sent


async def test_dashboard_shows_rate_rise_and_resets_an_open_breaker_without_console_errors(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, browser: Any
) -> None:
    upstream = await start_upstream(_hello())
    dead = free_port()  # nothing listens: every attempt fails to connect
    gw = await make_gateway(
        f"""
        [upstreams.app]
        targets = ["http://127.0.0.1:{upstream.port}"]

        [upstreams.flaky]
        targets = ["http://127.0.0.1:{dead}"]
        panic_threshold = 0.0
        [upstreams.flaky.breaker]
        failures = 1
        cooldown = 300.0
        max_cooldown = 300.0

        [[routes]]
        name = "busy"
        path = "/busy"
        upstream = "app"

        [[routes]]
        name = "broken"
        path = "/broken"
        upstream = "flaky"
        """
    )
    assert gw.admin_url is not None
    dead_url = f"http://127.0.0.1:{dead}"
    rps_cell = 'tr[data-route="busy"] td[data-field="rps"]'
    breaker_cell = f'tr[data-target="{dead_url}"] td[data-field="breaker"]'

    await asyncio.to_thread(browser.get, gw.admin_url + "/")
    # Before traffic: the server-rendered table says 0.0 req/s.
    assert await asyncio.to_thread(_cell, browser, rps_cell) == "0.0"

    stop = asyncio.Event()
    traffic = asyncio.create_task(_traffic(f"{gw.url}/busy/x", stop))
    try:
        shown: str = await _until(
            lambda: _rising(_cell(browser, rps_cell)), "a rising request rate for route busy"
        )
        assert float(shown) > 0
        # The chart of the route was drawn by the script.
        assert await asyncio.to_thread(
            browser.execute_script,
            "return document.querySelectorAll('[data-chart=\"busy\"] canvas').length",
        )
    finally:
        stop.set()
        sent = await traffic
    assert sent > 0

    # Open the breaker of the dead target with one failing request.
    async with aiohttp.ClientSession() as session, session.get(f"{gw.url}/broken") as response:
        assert response.status == 502
    assert gw.gateway.box is not None
    target = gw.gateway.box.snapshot.pools["flaky"].targets[0]
    assert target.breaker.state == "open"
    await _until(lambda: _cell(browser, breaker_cell) == "open", "the breaker open")

    def press_reset() -> bool:
        row = browser.find_element("css selector", f'tr[data-target="{dead_url}"]')
        row.find_element("css selector", "button").click()
        return True

    await asyncio.to_thread(press_reset)
    await _until(lambda: _cell(browser, breaker_cell) == "closed", "the breaker closed")
    assert target.breaker.state == "closed"  # type: ignore[comparison-overlap]
    flash = await asyncio.to_thread(_cell, browser, "#flash")
    assert flash == "breakers reset: 1"

    assert await asyncio.to_thread(_console_errors, browser) == []


async def test_dashboard_reads_without_javascript_as_plain_tables(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    # No browser needed: the HTML as served, before any script runs.
    upstream = await start_upstream(_hello())
    gw = await make_gateway(
        f"""
        [upstreams.app]
        targets = ["http://127.0.0.1:{upstream.port}"]

        [[routes]]
        name = "r<&>"
        path = "/"
        upstream = "app"
        """
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gw.url}/x") as response:
            assert response.status == 200
        async with session.get(f"{gw.admin_url}/") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            page = await response.text()
            csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp
    # The route's row is in the served table, its name escaped; the figures are there.
    assert '<tr data-route="r&lt;&amp;&gt;"' in page
    assert "r<&>" not in page
    assert f"http://127.0.0.1:{upstream.port}" in page
    # No external asset: nothing is loaded from another origin.
    for needle in ('src="http', 'href="http', "src='http", "@import"):
        assert needle not in page
    with contextlib.suppress(ValueError):
        page.index("<script src")
        raise AssertionError("the page loads a script file")


async def test_dashboard_asks_for_the_admin_token_and_sends_it_with_the_reset(
    make_gateway: GatewayFactory, browser: Any
) -> None:
    dead = free_port()
    gw = await make_gateway(
        f"""
        [server]
        listen = ["127.0.0.1:0"]
        admin = "127.0.0.1:0"
        admin_token_env = "OPS_TOKEN"

        [upstreams.flaky]
        targets = ["http://127.0.0.1:{dead}"]
        panic_threshold = 0.0
        [upstreams.flaky.breaker]
        failures = 1
        cooldown = 300.0

        [[routes]]
        name = "broken"
        path = "/"
        upstream = "flaky"
        """
    )
    # The in-process gateway's environment (the variable is read per request).
    gw.gateway.admin_ops.environ = {"OPS_TOKEN": "t0k3n"}
    async with aiohttp.ClientSession() as session, session.get(f"{gw.url}/x") as response:
        assert response.status == 502
    assert gw.admin_url is not None
    row = f'tr[data-target="http://127.0.0.1:{dead}"]'
    breaker_cell = f'{row} td[data-field="breaker"]'
    await asyncio.to_thread(browser.get, gw.admin_url + "/")
    assert await asyncio.to_thread(
        lambda: browser.find_element("css selector", "#token-box").is_displayed()
    )

    def press_reset() -> None:
        browser.find_element("css selector", f"{row} button").click()

    await asyncio.to_thread(press_reset)
    await _until(
        lambda: "Bearer" in (_cell(browser, "#flash") or ""), "the refusal of a reset without token"
    )
    assert await asyncio.to_thread(_cell, browser, breaker_cell) == "open"

    def type_token() -> None:
        box = browser.find_element("css selector", "#token")
        box.send_keys("t0k3n")

    await asyncio.to_thread(type_token)
    await asyncio.to_thread(press_reset)
    await _until(lambda: _cell(browser, breaker_cell) == "closed", "the breaker closed")
    # The refused POST answered 401: Chromium logs that as a console error, so
    # only script errors are checked here.
    errors = await asyncio.to_thread(_console_errors, browser)
    assert [e for e in errors if "401" not in e] == []
