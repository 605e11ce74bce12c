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
import hashlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from gateway.core.config import RedisConfig
from gateway.core.limits import (
    TOKEN_BUCKET_LUA,
    BucketStore,
    TokenBucket,
    shared_bucket,
    shared_key,
)
from gateway.state.metrics import CounterChild, Metrics

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger("gateway.ratelimit")

# Seconds a failed Redis stays skipped before one request tries it again.
RETRY_AFTER: Final = 1.0

# (Redis key, rate, burst, the waiting request's future)
_Take = tuple[str, str, int, "asyncio.Future[Any]"]


class SharedBuckets:
    """The buckets of every `store = "redis"` route, in one Redis."""

    def __init__(self, config: RedisConfig, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self._timeout = config.timeout
        # redis-py is imported here, by the first [redis] table, not at
        # start-up: it costs 22 MiB of RSS and 0.2 s that a gateway without
        # shared limits would carry for nothing.
        import redis.asyncio as aioredis
        from redis.exceptions import NoScriptError, RedisError

        self._no_script = NoScriptError
        self._store_errors = (RedisError, OSError, TimeoutError, ValueError, TypeError, IndexError)
        # redis-py's own timeouts bound the socket; asyncio.timeout below
        # bounds the whole command (connect, queueing for a connection, the
        # reply), which is what the contract promises the request.
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            config.url,
            socket_timeout=config.timeout,
            socket_connect_timeout=config.timeout,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._sha = hashlib.sha1(TOKEN_BUCKET_LUA.encode()).hexdigest()
        # Takes asked for in this loop iteration, sent together (see _flush).
        self._pending: list[_Take] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._errors: CounterChild = metrics.ratelimit_store_errors.labels()
        self._skip_until = float("-inf")  # while down: local buckets only, until then
        self.down = False

    async def take(self, route: str, key: str, local: BucketStore) -> tuple[bool, TokenBucket]:
        """Take a token from the shared bucket of `key` on `route`, or from
        `local` (the route's own bucket) while Redis is unreachable."""
        now = self._clock()
        if now < self._skip_until:
            return local.take(key)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((shared_key(route, key), repr(local.rate), local.burst, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        try:
            async with asyncio.timeout(self._timeout):
                reply = await future
            allowed, debt = int(reply[0]), float(reply[1])
        except asyncio.CancelledError:
            # The request itself was cancelled (client gone, drain): not an
            # outage. redis-py drops the connection the command was on.
            raise
        except self._store_errors as exc:
            self._failed(exc)
            return local.take(key)
        if self.down:
            self.down = False
            log.warning("rate-limit store %s answers again; shared limits resumed", self._where())
        return allowed == 1, shared_bucket(local.rate, local.burst, debt, self._clock())

    def _flush(self) -> None:
        """Send every take asked for since the last flush in one pipeline.

        Each take is still its own atomic script run, and a request still
        costs at most one round trip; but N requests of one loop iteration
        share one write and one read, which is most of redis-py's cost per
        command (measured: 73 µs of CPU alone, 17 µs each in a pipeline of 16).
        """
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _send(self, batch: list[_Take]) -> None:
        try:
            replies = await self._run(batch)
            missing = [i for i, r in enumerate(replies) if isinstance(r, self._no_script)]
            if missing:
                # A restarted (or flushed) Redis lost the script: load it, once.
                await self._client.script_load(TOKEN_BUCKET_LUA)
                again = await self._run([batch[i] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except asyncio.CancelledError:
            for *_, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # every failure goes to the waiting requests
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (*_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue  # its request gave up at `timeout`
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _run(self, batch: list[_Take]) -> list[Any]:
        if len(batch) == 1:
            key, rate, burst, _ = batch[0]
            try:
                return [await self._client.evalsha(self._sha, 1, key, rate, burst)]
            except self._no_script as exc:
                return [exc]
        pipe = self._client.pipeline(transaction=False)
        for key, rate, burst, _ in batch:
            pipe.evalsha(self._sha, 1, key, rate, burst)
        return list(await pipe.execute(raise_on_error=False))

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
        for task in list(self._flushes):
            task.cancel()
        await asyncio.gather(*self._flushes, return_exceptions=True)
        await self._client.aclose()
