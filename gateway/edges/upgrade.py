"""The WebSocket step of the handler: which upgrades go to the target, and the tunnel.

CONTRACT.md "WebSockets": a GET with `Connection: upgrade` and `Upgrade:
websocket` (h1server marks it `request.websocket`) is forwarded with its
upgrade headers on a route with `websocket = true`; on `101` from the
target the gateway relays bytes both ways (wire/tunnel.py) until either side
closes or nothing moves for `tunnel_idle_timeout`. Any other answer is
relayed as a normal response, and the connection closes after it. Other
upgrades (h2c) are never forwarded: their Upgrade is stripped with the
hop-by-hop headers. The upgrade request went through the same admission as
every request (route, method, IP access, auth, rate limit) before it gets
here.

The proxy calls three things, each at one place:
- `plan(request, route)` before the first attempt: whether this request is
  forwarded as an upgrade (raises BadRequest for a broken handshake);
- `add_headers(headers)` on each attempt's upstream headers, when planned;
- `tunnel(...)` instead of relaying the response, when the target said 101.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Sequence
from typing import Final

from multidict import CIMultiDict

from gateway.core.cors import merge_headers
from gateway.core.errors import BadGateway, BadRequest
from gateway.core.headers import client_response_headers
from gateway.state.log import AccessEntry
from gateway.state.snapshot import RouteRuntime
from gateway.wire import tunnel as tunnel_relay
from gateway.wire.h1client import H1Response
from gateway.wire.h1messages import Request

log = logging.getLogger("gateway.upgrade")

# RFC 6455 1.3: the GUID the target appends to the key for its accept value.
_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# How long a tunnel's last bytes may take to leave once it ended, before the
# connection is aborted (nginx's lingering_time is of this order).
CLOSE_GRACE: Final = 2.0


def plan(request: Request, route: RouteRuntime) -> bool:
    """Whether `request` goes to the target as a WebSocket upgrade.

    A handshake RFC 6455 4.2.1 calls invalid (no or a malformed
    Sec-WebSocket-Key, no Sec-WebSocket-Version) is refused with 400 here,
    before any target sees it: the target would refuse it too, and a
    gateway that forwards it lets a client probe the target's parser.
    """
    if not request.websocket or not route.config.websocket:
        return False
    headers = request.headers
    keys = headers.getall("Sec-WebSocket-Key", [])
    if len(keys) != 1:
        raise BadRequest("a WebSocket upgrade needs exactly one Sec-WebSocket-Key")
    try:
        nonce = base64.b64decode(keys[0].strip(), validate=True)
    except (binascii.Error, ValueError):
        nonce = b""
    if len(nonce) != 16:
        raise BadRequest("Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455 4.1)")
    if "Sec-WebSocket-Version" not in headers:
        raise BadRequest("a WebSocket upgrade needs Sec-WebSocket-Version")
    return True


def add_headers(headers: CIMultiDict[str]) -> None:
    """The upgrade headers, on the request the target gets (they are
    hop-by-hop, so the gateway's header rules removed the client's)."""
    headers["Connection"] = "upgrade"
    headers["Upgrade"] = "websocket"


def _accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.strip().encode() + _WS_GUID).digest()).decode()


def _switch_problem(request: Request, upstream: H1Response) -> str | None:
    """Why the target's 101 cannot be relayed, or None."""
    tokens = upstream.headers.get("Upgrade", "").lower().split(",")
    if not any(token.strip() == "websocket" for token in tokens):
        # It switched to something nobody asked for (h2c, or nothing).
        return "101 without Upgrade: websocket"
    key = request.headers.get("Sec-WebSocket-Key", "")
    if upstream.headers.get("Sec-WebSocket-Accept", "").strip() != _accept_for(key):
        return "101 with a wrong Sec-WebSocket-Accept"
    return None


async def tunnel(
    request: Request,
    route: RouteRuntime,
    upstream: H1Response,
    entry: AccessEntry,
    rid: str,
    extra_headers: Sequence[tuple[str, str]],
    cors_headers: Sequence[tuple[str, str]],
    target_url: str,
) -> None:
    """Answer 101 and relay until the tunnel ends, counting the bytes moved
    into `entry` (the access-log line: bytes_in up, bytes_out down).

    Raises BadGateway (nothing sent yet) when the target's 101 is not a
    WebSocket switch for this request."""
    problem = _switch_problem(request, upstream)
    if problem is not None:
        upstream.close()
        log.warning("request %s: target %s: %s", rid, target_url, problem)
        raise BadGateway(f'upstream "{route.pool.name}" answered the upgrade wrongly')
    headers = client_response_headers(upstream.headers, request_id=rid)
    for name, value in extra_headers:
        headers[name] = value
    if cors_headers:
        merge_headers(headers, cors_headers)
    headers["Connection"] = "upgrade"
    headers["Upgrade"] = "websocket"
    target_side = upstream.tunnel()
    try:
        request.writer.switch_protocols(headers)
        client_side = request.connection.take_tunnel(request)
    except BaseException:
        target_side.abort()
        raise

    tunnel_up, tunnel_down = route.tunnel_counters()

    def report(direction: str, count: int) -> None:
        if direction == "up":
            entry.bytes_in += count
            tunnel_up.inc(count)
        else:
            entry.bytes_out += count
            tunnel_down.inc(count)

    route.tunnels.inc()
    why = "cancelled"
    try:
        why = await tunnel_relay.relay(
            client_side, target_side, route.config.tunnel_idle_timeout, report
        )
    finally:
        route.tunnels.dec()
        # The client's side closes when the handler returns (h1server,
        # lingering); the target's here, after its last bytes left.
        target_side.close(CLOSE_GRACE)
        log.debug(
            "request %s: tunnel closed (%s), %d up, %d down",
            rid,
            why,
            entry.bytes_in,
            entry.bytes_out,
        )
