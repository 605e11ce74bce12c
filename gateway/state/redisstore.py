"""Rate-limit buckets shared through Redis (`store = "redis"`).

One `SharedBuckets` per `[redis]` table: a redis-py asyncio client (the
hiredis parser when installed) and the token-bucket script of
`gateway.core.limits`, run with EVALSHA so each request costs one atomic
round trip. When Redis fails or is slower than `timeout`, the route's local
bucket answers instead, at once: the outage is logged once, each failed
command counts in `gateway_ratelimit_store_errors_total`, and for the next
`RETRY_AFTER` seconds requests go straight to the local bucket rather than
each paying `timeout` again (as nginx's `max_fails`/`fail_timeout` keeps a
dead server out for a while). The first request after that tries Redis again;
when it answers, every request is back on it and the return is logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.core.config import RedisConfig
from gateway.core.limits import (
    TOKEN_BUCKET_LUA,
    BucketStore,
    TokenBucket,
    shared_bucket,
    shared_key,
)
from gateway.state.metrics import CounterChild, Metrics

log = logging.getLogger("gateway.ratelimit")

# Seconds a failed Redis stays skipped before one request tries it again.
RETRY_AFTER: Final = 1.0


class SharedBuckets:
    """The buckets of every `store = "redis"` route, in one Redis."""

    def __init__(self, config: RedisConfig, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self._timeout = config.timeout
        # redis-py's own timeouts bound the socket; asyncio.timeout below
        # bounds the whole command (connect, queueing for a connection, the
        # reply), which is what the contract promises the request.
        self._client = aioredis.Redis.from_url(
            config.url,
            socket_timeout=config.timeout,
            socket_connect_timeout=config.timeout,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._script = self._client.register_script(TOKEN_BUCKET_LUA)
        self._errors: CounterChild = metrics.ratelimit_store_errors.labels()
        self._skip_until = float("-inf")  # while down: local buckets only, until then
        self.down = False

    async def take(self, route: str, key: str, local: BucketStore) -> tuple[bool, TokenBucket]:
        """Take a token from the shared bucket of `key` on `route`, or from
        `local` (the route's own bucket) while Redis is unreachable."""
        now = self._clock()
        if now < self._skip_until:
            return local.take(key)
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._script(
                    keys=[shared_key(route, key)], args=[repr(local.rate), local.burst]
                )
            allowed, debt = int(reply[0]), float(reply[1])
        except asyncio.CancelledError:
            # The request itself was cancelled (client gone, drain): not an
            # outage. redis-py drops the connection the command was on.
            raise
        except (RedisError, OSError, TimeoutError, ValueError, TypeError, IndexError) as exc:
            self._failed(exc)
            return local.take(key)
        if self.down:
            self.down = False
            log.warning("rate-limit store %s answers again; shared limits resumed", self._where())
        return allowed == 1, shared_bucket(local.rate, local.burst, debt, self._clock())

    def _failed(self, exc: BaseException) -> None:
        self._errors.inc()
        self._skip_until = self._clock() + RETRY_AFTER
        if not self.down:
            self.down = True
            reason = (
                "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            )
            log.error(
                "rate-limit store %s unavailable (%s); routes use their local buckets until it "
                "answers",
                self._where(),
                reason,
            )

    def _where(self) -> str:
        # Never the password a URL may carry.
        kwargs = self._client.connection_pool.connection_kwargs
        if "path" in kwargs:
            return f"unix:{kwargs['path']}"
        return f"{kwargs.get('host')}:{kwargs.get('port')}"

    async def close(self) -> None:
        await self._client.aclose()
