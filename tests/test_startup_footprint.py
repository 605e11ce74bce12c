"""A gateway loads a heavy optional library only when its config needs it.

redis-py with hiredis (22 MiB of RSS, 0.2 s), PyJWT with `cryptography`
(15 MiB) and aiohttp-cors are imported by the first config that uses them,
so the idle footprint of a plain proxy is what it proxies with
(docs/performance.md "Idle memory"). Seen from outside, in the running
process's memory map: the libraries' compiled parts are either mapped or not.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import one_upstream_config
from tests.gateway_process import run_gateway

# Shared objects of the heavy libraries, as they appear in /proc/PID/maps.
_HEAVY = ("/hiredis/", "/cryptography/")


def _heavy_libraries(pid: int) -> set[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {name.strip("/") for name in _HEAVY if name in maps}


async def test_a_plain_proxy_maps_neither_redis_nor_cryptography(tmp_path: Path) -> None:
    # Port 9 (discard): no request is sent, the route only has to exist.
    async with run_gateway(tmp_path, one_upstream_config(9)) as gw:
        assert _heavy_libraries(gw.pid) == set()


async def test_a_shared_rate_limit_loads_the_redis_client_it_needs(tmp_path: Path) -> None:
    # The client is made when the config is applied; it connects on first use,
    # so no redis-server has to run for its library to be loaded.
    config = (
        one_upstream_config(
            9,
            extra_route="""
        [routes.rate_limit]
        rate = 10
        burst = 10
        store = "redis"
        """,
        )
        + """
        [redis]
        url = "redis://127.0.0.1:9"
        """
    )
    async with run_gateway(tmp_path, config) as gw:
        assert "hiredis" in _heavy_libraries(gw.pid)
