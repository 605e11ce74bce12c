"""The byte tunnel after `101 Switching Protocols` (WebSocket): both ways at once.

Each direction reads from one side and writes to the other with
backpressure: a side that reads slowly stops the gateway reading its peer
(the client's socket pauses above 256 KiB unread, the target's likewise), so
a tunnel costs the same memory whatever its traffic. Where both sockets are
plain TCP, each direction is a zero-copy `splice(2)` relay (splice.py's
`Relay.pump`) and no byte enters Python; on TLS, or when no relay can be had,
bytes are copied.

The tunnel ends when either side closes (after what it sent has been passed
on, e.g. a WebSocket close frame), fails, or when no byte moved either way
for `idle_timeout` seconds (nginx's proxy_read_timeout on an upgraded
connection counts the same way). Its owner then closes both connections.

splice.py's rule holds: no descriptor number is kept across an await; each
side's socket is duplicated at once, in one synchronous step, and only the
duplicates are used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from gateway.wire import splice
from gateway.wire.h1client import H1Error, UpstreamTunnel
from gateway.wire.h1messages import ClientTunnel

log = logging.getLogger("gateway.tunnel")

#: How often (at most) the idle watch and the byte counters are brought up
#: to date; the idle timeout itself is checked at an eighth of its length.
_WATCH_MAX: Final = 5.0
_WATCH_MIN: Final = 0.02

# (direction "up" | "down", bytes moved since the last report)
Report = Callable[[str, int], None]


class _Moved:
    __slots__ = ("down", "up")

    def __init__(self) -> None:
        self.up = 0
        self.down = 0


async def relay(
    client: ClientTunnel,
    upstream: UpstreamTunnel,
    idle_timeout: float,
    report: Report,
) -> str:
    """Relay until one side closes or the tunnel idles; returns why it ended:
    "client" / "upstream" (that side closed or failed) or "idle".

    Cancellation (the client vanished, drain_timeout) stops both directions
    at once. The caller closes both connections afterwards.
    """
    moved = _Moved()
    # What each side sent before the relay began: the client's bytes after
    # its request head, the target's after its 101.
    client.pause()
    early_up = client.inbox.read_nowait()
    early_down, upstream_dup = upstream.hand_over()
    try:
        if early_up:
            upstream.write(early_up)
            moved.up += len(early_up)
        if early_down:
            client.write(early_down)
            moved.down += len(early_down)
    except (ConnectionError, H1Error):
        if upstream_dup is not None:
            upstream_dup.close()
        raise
    spliced = _splice_pair(client, upstream_dup)
    if spliced is None:
        client.resume()
        upstream.resume()
        directions = {
            asyncio.create_task(_copy(client.read, upstream, moved, "up")): "client",
            asyncio.create_task(_copy(upstream.read, client, moved, "down")): "upstream",
        }
        return await _watch(directions, moved, idle_timeout, report, ())
    client_dup, upstream_dup, up_relay, down_relay = spliced
    held = (client_dup, upstream_dup, up_relay, down_relay)

    async def up() -> None:
        await splice.wait_flushed(upstream_dup, None)
        await up_relay.pump(client_dup, upstream_dup)

    async def down() -> None:
        await splice.wait_flushed(client_dup, None)
        await down_relay.pump(upstream_dup, client_dup)

    moved_before = moved.up, moved.down

    def sync() -> None:
        moved.up = moved_before[0] + up_relay.moved
        moved.down = moved_before[1] + down_relay.moved

    directions = {
        asyncio.create_task(up()): "client",
        asyncio.create_task(down()): "upstream",
    }
    return await _watch(directions, moved, idle_timeout, report, held, sync)


def _splice_pair(
    client: ClientTunnel, upstream_dup: splice.SocketDup | None
) -> tuple[splice.SocketDup, splice.SocketDup, splice.Relay, splice.Relay] | None:
    """Both sockets' duplicates and two relays, or None (then copy): TLS on
    either side, no splice here, or the tunnel relays at their cap."""
    if upstream_dup is None:
        return None
    client_dup = splice.dup_socket(client.transport)  # now, before any await
    if client_dup is None:
        upstream_dup.close()
        return None
    up_relay = splice.Relay.open_for_tunnel()
    down_relay = splice.Relay.open_for_tunnel() if up_relay is not None else None
    if up_relay is None or down_relay is None:
        if up_relay is not None:
            up_relay.close()
        client_dup.close()
        upstream_dup.close()
        return None
    return client_dup, upstream_dup, up_relay, down_relay


async def _copy(
    read: Callable[[], Awaitable[bytes]],
    sink: ClientTunnel | UpstreamTunnel,
    moved: _Moved,
    direction: str,
) -> None:
    while True:
        data = await read()
        if not data:
            return
        sink.write(data)
        if direction == "up":
            moved.up += len(data)
        else:
            moved.down += len(data)
        await sink.drain()


async def _watch(
    directions: dict[asyncio.Task[None], str],
    moved: _Moved,
    idle_timeout: float,
    report: Report,
    held: tuple[splice.SocketDup | splice.Relay, ...],
    sync: Callable[[], None] | None = None,
) -> str:
    """Until a direction ends or nothing moved for `idle_timeout`; reports
    the bytes moved as it goes. Cancels and awaits both directions, then
    releases `held` (duplicates, relays) whatever happens."""
    step = min(max(idle_timeout / 8, _WATCH_MIN), _WATCH_MAX)
    loop = asyncio.get_running_loop()
    reported_up = reported_down = 0
    last_total = -1
    last_at = loop.time()
    why = "idle"

    def flush() -> None:
        nonlocal reported_up, reported_down
        if sync is not None:
            sync()
        if moved.up > reported_up:
            report("up", moved.up - reported_up)
            reported_up = moved.up
        if moved.down > reported_down:
            report("down", moved.down - reported_down)
            reported_down = moved.down

    try:
        while True:
            done, _ = await asyncio.wait(
                directions, timeout=step, return_when=asyncio.FIRST_COMPLETED
            )
            flush()
            if done:
                task = next(iter(done))
                why = directions[task]
                if not task.cancelled() and (error := task.exception()) is not None:
                    log.debug("tunnel ended: %s side: %s", why, error)
                break
            now = loop.time()
            total = moved.up + moved.down
            if total != last_total:
                last_total, last_at = total, now
            elif now - last_at >= idle_timeout:
                why = "idle"
                break
    finally:
        for task in directions:
            task.cancel()
        try:
            # Their own errors are the tunnel's end, already told by `why`.
            await asyncio.gather(*directions, return_exceptions=True)
        finally:
            flush()
            for item in held:
                item.close()
    return why
