"""Key stores: JWKS (file or URL), API-key tables, and the verified-token cache.

`AuthState` outlives snapshots, as `Runtime` does: a policy whose rules did
not change keeps its token cache and its JWKS fetcher across a reload, and
the cache drops only the tokens that the new key set no longer vouches for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from gateway.core.auth import (
    MAX_JWKS_BYTES,
    ApiKeyPolicy,
    ApiKeyTable,
    AuthPolicy,
    Identity,
    JwtPolicy,
    Verified,
    VerifyingKey,
    parse_jwks,
    secret_fingerprint,
)

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("gateway.auth")

# A token with an unknown `kid` refetches the JWKS at most this often (CONTRACT.md).
KID_REFETCH_FLOOR: Final = 30.0
FETCH_TIMEOUT: Final = 10.0
# How long a request with an unknown kid waits for the refetch it triggered.
KID_WAIT: Final = 5.0
TOKEN_CACHE_SIZE: Final = 10_000
# Characters of token text the cache may hold: 10,000 tokens of 800 characters
# (a typical RS256 access token), or 1,024 of the largest accepted (8 KiB).
TOKEN_CACHE_CHARS: Final = 8 << 20


class TokenCache:
    """Verified tokens by their text, each until its `exp` (+leeway).

    Keyed by the token itself, not a digest of it: the hit path of a token
    sent again is then one dict probe (the str hash, seeded per process) and
    one comparison, where a SHA-256 per request cost ~0.9 µs of the JWT
    route's budget (bench/auth.py). Timing tells a client nothing: a probe
    compares two strings only when their seeded 64-bit hashes are equal,
    which a client cannot arrange for a token it does not hold.

    Bounded twice: past `maxsize` entries or `maxchars` characters of token
    text the oldest entries go (insertion order), so ten thousand distinct
    tokens of the largest size accepted (8 KiB) cost at most `maxchars`
    characters. Only tokens that passed are stored: a bad one is re-checked
    each time, which costs the sender as much as us.

    Not cachetools' TTLCache: every token has its own expiry (its `exp`),
    which one TTL cannot say, and the hit path here is one dict probe and a
    comparison; TLRUCache, which can say it, spent more per request than the
    whole budget of a cached check (bench/auth.py).
    """

    def __init__(
        self,
        maxsize: int = TOKEN_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
        maxchars: int = TOKEN_CACHE_CHARS,
    ):
        self._entries: dict[str, Verified] = {}
        self._maxsize = maxsize
        self._maxchars = maxchars
        self._chars = 0  # characters of the tokens held
        self._clock = clock

    def get(self, token: str) -> Verified | None:
        verified = self._entries.get(token)
        if verified is None:
            return None
        if verified.expires_at <= self._clock():
            del self._entries[token]
            self._chars -= len(token)
            return None
        return verified

    def put(self, token: str, verified: Verified) -> None:
        entries = self._entries
        if entries.pop(token, None) is not None:
            self._chars -= len(token)
        size = len(token)
        if size > self._maxchars:
            return
        while entries and (len(entries) >= self._maxsize or self._chars + size > self._maxchars):
            oldest = next(iter(entries))
            del entries[oldest]
            self._chars -= len(oldest)
        entries[token] = verified
        self._chars += size

    def retain(self, fingerprints: set[str]) -> int:
        """Drop tokens verified by a key not in `fingerprints`; returns how many."""
        gone = [k for k, v in self._entries.items() if v.fingerprint not in fingerprints]
        for token in gone:
            del self._entries[token]
            self._chars -= len(token)
        return len(gone)

    @property
    def chars(self) -> int:
        return self._chars

    def __len__(self) -> int:
        return len(self._entries)


class JwksFetcher:
    """A JWKS URL, fetched with aiohttp at start-up and every `refresh` seconds.

    Start-up does not wait on it. A failed fetch keeps the last good set and
    is logged. `refetch()` (a token with an unknown kid) joins a fetch that
    is running, or starts one if none started in the last 30 s.
    """

    def __init__(
        self,
        policy: str,
        url: str,
        refresh: float,
        on_keys: Callable[[list[VerifyingKey]], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.url = url
        self.refresh = refresh
        self._on_keys = on_keys
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._last_started_at = -KID_REFETCH_FLOOR
        self.fetches = 0
        self.failures = 0

    def start(self) -> None:
        """Begin the refresh loop (needs a running loop; later calls do nothing)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"jwks {self.policy}"
            )

    async def _run(self) -> None:
        while True:
            await self._fetch_shared()
            await asyncio.sleep(self.refresh)

    def _fetch_shared(self) -> asyncio.Future[bool]:
        if self._inflight is None or self._inflight.done():
            self._last_started_at = self._clock()
            self._inflight = asyncio.get_running_loop().create_task(self._fetch())
        return asyncio.shield(self._inflight)

    async def refetch(self) -> bool:
        """For an unknown kid: True when a fetch brought a new key set in time."""
        self.start()
        if (self._inflight is None or self._inflight.done()) and (
            self._clock() - self._last_started_at < KID_REFETCH_FLOOR
        ):
            return False
        try:
            async with asyncio.timeout(KID_WAIT):
                return await self._fetch_shared()
        except TimeoutError:
            return False

    async def _fetch(self) -> bool:
        self.fetches += 1
        try:
            if self._session is None:
                import aiohttp  # lazily: only JWKS URLs need it

                self._session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
                )
            async with self._session.get(self.url, allow_redirects=False) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                # read(n) returns what is buffered, not the whole body: a
                # JWKS sent in several chunks must be read to its end, and
                # refused as soon as it passes the cap.
                body = bytearray()
                async for chunk in response.content.iter_any():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise ValueError(f"JWKS over {MAX_JWKS_BYTES} bytes")
            keys = parse_jwks(bytes(body))
            if not keys:
                raise ValueError("no usable signature key")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure: keep the last good set (CONTRACT.md)
            self.failures += 1
            log.warning(
                "auth %s: JWKS fetch from %s failed, keeping the last good key set: %s",
                self.policy,
                self.url,
                exc or type(exc).__name__,
            )
            return False
        self._on_keys(keys)
        return True

    async def close(self) -> None:
        for task in (self._task, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._session is not None:
            await self._session.close()


class JwtKeys:
    """One JWT policy's keys and token cache."""

    def __init__(self, policy: JwtPolicy) -> None:
        self.policy = policy
        self.cache = TokenCache()
        self.keys: list[VerifyingKey] = []
        self.fetcher: JwksFetcher | None = None
        self.update(policy)

    def update(self, policy: JwtPolicy) -> None:
        """New key material for the same rules (a reload re-read the file)."""
        self.policy = policy
        if policy.jwks is not None:
            self.set_keys(parse_jwks(policy.jwks))
        else:  # a URL's keys stay until its next fetch; a changed secret still prunes
            self.set_keys(self.keys if policy.jwks_url is not None else [])

    def set_keys(self, keys: list[VerifyingKey]) -> None:
        self.keys = keys
        vouching = {k.fingerprint for k in keys}
        if self.policy.secret:
            vouching.add(secret_fingerprint(self.policy.secret))
        dropped = self.cache.retain(vouching)
        if dropped:
            log.info(
                "auth %s: %d cached token(s) dropped with their key", self.policy.name, dropped
            )


class ApiKeys:
    """One API-key policy's table, and the identity of each key seen valid.

    A key sent again is found by one dict probe on the key as sent, without
    the SHA-256 of `ApiKeyTable.find` (0.45 µs of the route's budget) and
    without a new Identity per request. Still no timing about which keys
    exist: only keys that passed `find` are remembered, so a key that is not
    one never meets a stored string unless its seeded 64-bit str hash equals
    a stored key's (which a client cannot arrange without holding the key),
    and then takes `find`'s path, whose cost does not depend on the table.
    That a remembered key answers faster tells its sender only that it is
    valid, which the 200 tells anyway. Bounded by the table: one entry per
    consumer. A reload builds a new ApiKeys, so a revoked key stops at once.
    """

    __slots__ = ("_seen", "policy", "table")

    def __init__(self, policy: ApiKeyPolicy) -> None:
        self.policy = policy
        self.table = ApiKeyTable(policy.consumers)
        self._seen: dict[str, Identity] = {}

    def identity(self, key: str) -> Identity | None:
        identity = self._seen.get(key)
        if identity is not None:
            return identity
        consumer = self.table.find(key)
        if consumer is None:
            return None
        identity = Identity(self.policy.name, consumer.name, frozenset(consumer.scopes), {})
        # Two spellings of one key (a lone surrogate and the byte it stands
        # for) would be two entries: the cap keeps the bound all the same.
        if len(self._seen) < len(self.policy.consumers):
            self._seen[key] = identity
        return identity

    def __len__(self) -> int:
        return len(self._seen)


@dataclass
class PolicySet:
    """The policies of one snapshot, by name; `forwarded` holds the lower-cased
    names of every header any policy sends to targets (removed from every
    incoming request, on every route)."""

    jwt: dict[str, JwtKeys] = field(default_factory=dict)
    api_keys: dict[str, ApiKeys] = field(default_factory=dict)
    forwarded: frozenset[str] = frozenset()
    # What each policy sends: (claim, header); claim None = the consumer's name.
    forwards: dict[str, tuple[tuple[str | None, str], ...]] = field(default_factory=dict)
    # The header each key policy reads its key from.
    key_headers: dict[str, str] = field(default_factory=dict)


@dataclass
class AuthState:
    """Key stores kept across reloads, by policy name."""

    jwt: dict[str, JwtKeys] = field(default_factory=dict)
    _closing: set[asyncio.Task[None]] = field(default_factory=set)

    def build(self, policies: dict[str, AuthPolicy]) -> PolicySet:
        out = PolicySet()
        forwarded: set[str] = set()
        for name, policy in policies.items():
            if isinstance(policy, ApiKeyPolicy):
                out.api_keys[name] = ApiKeys(policy)
                out.key_headers[name] = policy.header
                if policy.forward_consumer:
                    forwarded.add(policy.forward_consumer.lower())
                    out.forwards[name] = ((None, policy.forward_consumer),)
                continue
            forwarded.update(header.lower() for _, header in policy.forward_claims)
            out.forwards[name] = policy.forward_claims
            keys = self.jwt.get(name)
            if keys is not None and keys.policy.rules() == policy.rules():
                keys.update(policy)
            else:
                if keys is not None:
                    self._retire(keys)
                keys = JwtKeys(policy)
                if policy.jwks_url is not None:
                    keys.fetcher = JwksFetcher(
                        name, policy.jwks_url, policy.jwks_refresh, keys.set_keys
                    )
                self.jwt[name] = keys
            out.jwt[name] = keys
        for name in [n for n in self.jwt if n not in out.jwt]:
            self._retire(self.jwt.pop(name))
        out.forwarded = frozenset(forwarded)
        return out

    def start(self) -> None:
        """Start the JWKS URL fetchers (needs the running loop)."""
        for keys in self.jwt.values():
            if keys.fetcher is not None:
                keys.fetcher.start()

    def _retire(self, keys: JwtKeys) -> None:
        fetcher = keys.fetcher
        if fetcher is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(fetcher.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for keys in self.jwt.values():
            if keys.fetcher is not None:
                await keys.fetcher.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
