"""Raw HTTP/1.1 on a socket, for tests that must see exactly what the gateway sends."""

from __future__ import annotations

import asyncio
import hashlib

from aiohttp import web


async def read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    """The status line and the header fields (names lower-cased) of one response."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Status code, header fields and Content-Length body of one response."""
    status_line, headers = await read_head(reader)
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def hash_sink(request: web.Request) -> web.Response:
    """An upstream handler: reads the body as it streams in, answers its size and sha256."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({"size": size, "sha256": digest.hexdigest()})
