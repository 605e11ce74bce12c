"""A minimal HTTP/1.1 target for the never-dark tests, in-process or as a process.

`python -m tests.pool_target PORT NAME` serves on 127.0.0.1:PORT and prints
"ready" once listening, so a test can kill it (SIGKILL), freeze it (SIGSTOP)
and start it again on the same port. Every request gets `200` with the name
as the body, `/healthz` included (not counted in `requests`); with `hang`
set (in-process only) requests are read and never answered. Raw asyncio, no
framework: a restart must take milliseconds, not an import of aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


class Target:
    """The in-process form: `start()`, `down()` (close and reset every
    connection, as a crash does) and `start()` again on the same port."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.port = port
        self.hang = False
        self.in_flight = 0
        self.most_in_flight = 0
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        body = self.name.encode()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"GET /healthz "):  # probes are not counted
                    self.requests += 1
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
                try:
                    if self.hang:
                        # Silent until the gateway gives up and closes.
                        while await reader.read(65536):
                            pass
                        break
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
                    await writer.drain()
                finally:
                    self.in_flight -= 1
                if b"connection: close" in head.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


async def _main(port: int, name: str) -> None:
    target = Target(name, port)
    await target.start()
    print("ready", flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1]), sys.argv[2]))
