"""gateway: a streaming HTTP API gateway on aiohttp."""

__version__ = "0.1.0"
