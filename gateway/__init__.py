"""gateway: a streaming HTTP/1.1 API gateway.

The proxy listeners run on the gateway's own HTTP/1.1 server over asyncio and
httptools; aiohttp serves the admin listener, health probes and DNS.
"""

__version__ = "0.1.0"
