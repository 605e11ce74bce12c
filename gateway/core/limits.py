"""Rate limits: token buckets, a bounded store of them, and their headers.

A bucket holds up to `burst` tokens and refills continuously at `rate` tokens
per second; a request takes one token or is refused (429). Time is always
passed in (monotonic seconds), never read here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Final, Protocol

from cachetools import TTLCache
from multidict import istr

__all__ = [
    "DEFAULT_MAX_KEYS",
    "TOKEN_BUCKET_LUA",
    "BucketStore",
    "SharedStore",
    "TokenBucket",
    "rate_limit_headers",
    "shared_bucket",
    "shared_key",
]

DEFAULT_MAX_KEYS: Final = 100_000

# Float slack when turning token counts and durations into the whole numbers
# the headers carry: 2.9999999999 tokens is 3 after a refill of 0.1 + 0.2 ...,
# and 1.0000000001 s until full is 1 s, not 2.
_EPSILON: Final = 1e-9


class TokenBucket:
    """A token bucket, stored as the one instant at which it will be full.

    This is the GCRA form of the bucket (ITU-T I.371's "virtual scheduling"):
    tokens at `now` are `burst - rate * (full_at - now)`, capped at `burst`.
    Keeping one float instead of (tokens, last refill) means a take is one
    comparison and one addition, and no refill is ever computed and stored,
    so rounding does not pile up across partial refills. The bucket starts
    full (`full_at` = -inf).
    """

    __slots__ = ("_full_at", "burst", "rate", "stored_until")

    def __init__(self, rate: float, burst: int) -> None:
        if not (rate > 0.0 and math.isfinite(rate)):
            raise ValueError("rate must be a positive number of tokens per second")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.rate: Final = rate
        self.burst: Final = burst
        self._full_at = -math.inf
        # When the BucketStore holding it will expire it (its TTL deadline).
        self.stored_until = -math.inf

    @property
    def full_at(self) -> float:
        return self._full_at

    def take(self, now: float) -> bool:
        """Take one token if there is one; False (and nothing taken) otherwise."""
        full_at = self._full_at
        if full_at < now:
            full_at = now
        # Tokens >= 1  <=>  burst - rate * (full_at - now) >= 1.
        if (full_at - now) * self.rate > self.burst - 1 + _EPSILON:
            return False
        self._full_at = full_at + 1.0 / self.rate
        return True

    def tokens(self, now: float) -> float:
        """Tokens in the bucket at `now`, fractional, between 0 and `burst`."""
        debt = self._full_at - now
        if debt <= 0.0:
            return float(self.burst)
        left = self.burst - debt * self.rate
        return left if left > 0.0 else 0.0

    def seconds_until_token(self, now: float) -> float:
        """Seconds until `take()` would succeed; 0 if it would now."""
        wait = self._full_at - now - (self.burst - 1) / self.rate
        return wait if wait > 0.0 else 0.0

    def seconds_until_full(self, now: float) -> float:
        wait = self._full_at - now
        return wait if wait > 0.0 else 0.0

    def __repr__(self) -> str:
        return f"<TokenBucket rate={self.rate} burst={self.burst}>"


class BucketStore:
    """Buckets by key (client IP, API key, route), bounded in number and age.

    Backed by a `cachetools.TTLCache` on the injected clock:

    - An idle bucket expires `burst / rate` seconds after its last admitted
      request. By then it has refilled completely, so dropping it and later
      starting that key with a new, full bucket changes nothing.
    - At most `max_keys` buckets are kept, so a flood of distinct keys (spoofed
      API keys, a botnet) costs bounded memory. When the cap is reached and a
      new key arrives, the least recently used bucket is evicted, and if its
      key comes back it starts with a full bucket. That forgives a client that
      was rate limited only when more than `max_keys` other keys were seen
      since its last request; size `max_keys` above the number of keys that
      are active within one `burst / rate` window.
    """

    __slots__ = ("_buckets", "_ttl", "burst", "clock", "max_keys", "rate")

    def __init__(
        self,
        rate: float,
        burst: int,
        max_keys: int = DEFAULT_MAX_KEYS,
        *,
        clock: Callable[[], float],
    ) -> None:
        TokenBucket(rate, burst)  # validate once, with its error messages
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate: Final = rate
        self.burst: Final = burst
        self.max_keys: Final = max_keys
        self.clock: Final = clock
        self._ttl = burst / rate
        self._buckets: TTLCache[str, TokenBucket] = TTLCache(
            maxsize=max_keys, ttl=self._ttl, timer=clock
        )

    def take(self, key: str) -> tuple[bool, TokenBucket]:
        """Take a token from `key`'s bucket; the bucket comes back for the headers.

        Read `clock()` again, or pass the same instant, for `rate_limit_headers`.
        """
        now = self.clock()
        buckets = self._buckets
        try:
            # Also marks the key recently used. Not .get(): TTLCache's get is
            # a membership test plus a lookup, each checking the expiry.
            bucket = buckets[key]
        except KeyError:
            bucket = TokenBucket(self.rate, self.burst)
        if not bucket.take(now):
            # Nothing was taken, so the bucket is full no later than the
            # expiry already set at its last admitted request; skipping the
            # re-insert keeps the refusal path (the one a flood hits) cheap.
            return False, bucket
        # TTLCache counts the ttl from insertion, not from the last read:
        # re-inserting restarts it, so a busy bucket never expires half empty.
        # Only needed when the bucket would now outlive its deadline; most
        # takes (a bucket far from empty) skip the costly re-insert.
        if bucket._full_at > bucket.stored_until:  # (the property's call saved)
            buckets[key] = bucket
            bucket.stored_until = now + self._ttl
        return True, bucket

    def peek(self, key: str) -> TokenBucket:
        """`key`'s bucket as it stands (a new, full one if it has none).

        Takes no token and stores nothing: for the headers of a response that
        was refused before the bucket was asked (413), which still must show
        the client its limit.
        """
        bucket = self._buckets.get(key)
        return bucket if bucket is not None else TokenBucket(self.rate, self.burst)

    def __len__(self) -> int:
        return len(self._buckets)


# The shared (Redis) form of `TokenBucket.take`: the same GCRA rule, run
# atomically inside Redis so that every gateway process drawing on one key
# sees one bucket, in one round trip (EVALSHA). KEYS[1] holds the instant the
# bucket is full, on Redis's own clock (TIME), so hosts whose clocks differ
# still agree; it expires once the bucket would be full anyway (an absent key
# is a full bucket, as an expired BucketStore entry is). The reply is
# {allowed (1|0), seconds until full (a decimal string: Redis turns Lua
# numbers into integers)}, from which the caller rebuilds a bucket for the
# headers on its own monotonic clock. `%.6f` keeps microseconds: Lua's
# tostring() keeps 14 digits, i.e. 0.1 ms of an epoch, which at 200/s (5 ms a
# token) would drift the rate by up to 2 %.
TOKEN_BUCKET_LUA: Final = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local full_at = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if full_at < now then full_at = now end
if (full_at - now) * rate > burst - 1 + 1e-9 then
  return {0, string.format('%.6f', full_at - now)}
end
full_at = full_at + 1 / rate
redis.call('SET', KEYS[1], string.format('%.6f', full_at),
           'PX', math.ceil((full_at - now) * 1000) + 1)
return {1, string.format('%.6f', full_at - now)}
"""


class SharedStore(Protocol):
    """Buckets shared by several processes (Redis; a worker's main process).

    `take` draws from the shared bucket of `key` on `route`, or from `local`
    (the route's own store, same rate and burst) when the shared one cannot
    answer in time."""

    async def take(self, route: str, key: str, local: BucketStore) -> tuple[bool, TokenBucket]: ...


def shared_key(route: str, key: str) -> str:
    """The Redis key of `key`'s bucket on `route`.

    Length-prefixed, so no route name and bucket key pair can collide with
    another (a route "a:b" with key "c" against route "a" with key "b:c").
    """
    return f"gateway:rl:{len(route)}:{route}:{key}"


def shared_bucket(rate: float, burst: int, debt: float, now: float) -> TokenBucket:
    """A local bucket standing for the shared one Redis answered about.

    `debt` is the seconds until the shared bucket is full, as the script
    returned it; `now` the local monotonic instant the headers are computed
    for. A hostile or broken answer (negative, NaN, huge) is clamped to what a
    bucket can be: full, or empty for `burst / rate` seconds.
    """
    bucket = TokenBucket(rate, burst)
    if math.isnan(debt) or debt <= 0.0:
        return bucket
    bucket._full_at = now + min(debt, (burst + 1) / rate)
    return bucket


# The names as istr: the handler sets them on every response of a limited
# route, and a CIMultiDict folds an istr's case once, not per set.
_RATELIMIT_POLICY: Final = istr("RateLimit-Policy")
_RATELIMIT: Final = istr("RateLimit")
_X_RATELIMIT_LIMIT: Final = istr("X-RateLimit-Limit")
_X_RATELIMIT_REMAINING: Final = istr("X-RateLimit-Remaining")
_X_RATELIMIT_RESET: Final = istr("X-RateLimit-Reset")
_RETRY_AFTER: Final = istr("Retry-After")


def rate_limit_headers(
    route: str, bucket: TokenBucket, now: float, allowed: bool
) -> list[tuple[str, str]]:
    """The CONTRACT's rate-limit response headers for one request on `route`.

    `RateLimit-Policy` and `RateLimit` follow draft-ietf-httpapi-ratelimit-headers
    (-11): the policy name is an sf-string (RFC 9651 section 3.3.3), `q` the
    quota (burst), `w` the seconds an empty bucket takes to refill, `r` the
    whole tokens left and `t` the seconds until the bucket is full again. The
    X-RateLimit-* trio carries the same numbers for older clients; a refusal
    adds Retry-After (RFC 9110 section 10.2.3), whole seconds and at least 1,
    because "0" would invite an immediate retry that is refused again.

    On a refusal, `X-RateLimit-Reset` is Retry-After's number, not the seconds
    until full: clients of the classic headers (GitHub's, Twitter's) sleep
    until the "reset" after a 429, and for a token bucket the wait that ends
    the refusal is the next token, not a full bucket. Two numbers on one 429
    that tell the client two different waits would be a contradiction; the
    full-bucket time stays in `RateLimit`'s `t`.
    """
    burst = bucket.burst
    name, policy, limit = _fixed_parts(route, burst, bucket.rate)
    # tokens() and seconds_until_full() inline: this runs on every response
    # of a limited route.
    debt = bucket._full_at - now
    if debt > 0.0:
        left = burst - debt * bucket.rate
        remaining = str(math.floor(left + _EPSILON)) if left > 0.0 else "0"
        reset = str(max(0, math.ceil(debt - _EPSILON)))
    else:
        remaining, reset = str(burst), "0"
    headers: list[tuple[str, str]] = [
        (_RATELIMIT_POLICY, policy),
        (_RATELIMIT, f"{name};r={remaining};t={reset}"),
        (_X_RATELIMIT_LIMIT, limit),
        (_X_RATELIMIT_REMAINING, remaining),
        (_X_RATELIMIT_RESET, reset),
    ]
    if not allowed:
        retry_after = str(max(1, _ceil(bucket.seconds_until_token(now))))
        headers[4] = (_X_RATELIMIT_RESET, retry_after)
        headers.append((_RETRY_AFTER, retry_after))
    return headers


@functools.lru_cache(maxsize=1024)
def _fixed_parts(route: str, burst: int, rate: float) -> tuple[str, str, str]:
    """What does not change between requests: the sf-string name, the policy, the limit."""
    name = _sf_string(route)
    return name, f"{name};q={burst};w={_ceil(burst / rate)}", str(burst)


def _ceil(seconds: float) -> int:
    return max(0, math.ceil(seconds - _EPSILON))


def _sf_string(value: str) -> str:
    """`value` as a structured-field string (RFC 9651 section 3.3.3).

    Only `"` and `\\` need escaping. An sf-string can hold nothing but
    printable ASCII, so anything else becomes `?` rather than producing a
    header that strict parsers reject (config.py should not let such route
    names through in the first place).
    """
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    out = []
    for ch in value:
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("?")
    return '"' + "".join(out) + '"'
