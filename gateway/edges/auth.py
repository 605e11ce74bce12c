"""The identity step of the handler: IP access, auth, scopes and claims,
forwarded identity headers, header transforms and redirects.

The proxy calls it at four points (see proxy.py, each marked `# auth hook`):
`check()` after routing (403 / 401 / 403 in the contract's order),
`request_headers()` once the upstream request head is built,
`response_headers()` once a target's response head is finished, and
`redirect()` for a route that answers with one instead of an upstream.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.core.auth import (
    HeaderTransform,
    Identity,
    TokenRejected,
    UnknownKid,
    api_key_challenge,
    bearer_challenge,
    bearer_token,
    claim_text,
    claims_match,
    expand,
    has_scopes,
    sendable,
    verify_jwt,
)
from gateway.core.errors import BadRequest, Forbidden, Unauthorized
from gateway.core.routing import forward_path, has_dot_segment
from gateway.state.auth import JwtKeys, PolicySet
from gateway.state.snapshot import RouteRuntime, Snapshot
from gateway.wire.h1messages import Reply

log = logging.getLogger("gateway.auth")

_EMPTY: Final[dict[str, Any]] = {}


class RequestAuth:
    """One request's identity and the values its placeholders read."""

    __slots__ = ("_values", "client", "host", "identity", "jwt", "policies", "request_id", "route")

    def __init__(
        self,
        identity: Identity | None,
        policies: PolicySet,
        jwt: bool,
        client: str,
        request_id: str,
        route: str,
        host: str | None,
    ) -> None:
        self.identity = identity
        self.policies = policies
        self.jwt = jwt  # the identity came from a JWT policy
        self.client = client
        self.request_id = request_id
        self.route = route
        self.host = host
        self._values: dict[str, str] | None = None

    @property
    def values(self) -> dict[str, str]:
        """The placeholders' values, built on first use: most routes have no
        transform that reads them."""
        values = self._values
        if values is None:
            identity = self.identity
            values = self._values = {
                "client_ip": self.client,
                "request_id": self.request_id,
                "route": self.route,
                "host": self.host or "",
                "consumer": identity.consumer or "" if identity is not None else "",
            }
        return values

    @property
    def consumer(self) -> str | None:
        return self.identity.consumer if self.identity is not None else None

    @property
    def who(self) -> str:
        """Whom state is kept for (cache entries, rate-limit buckets): "" for
        nobody, else the policy and its consumer, length-prefixed so that no
        pair of names spells another (a JWT `sub` and an API-key consumer of
        the same name are two clients)."""
        identity = self.identity
        if identity is None or identity.consumer is None:
            return ""
        return f"{len(identity.policy)}:{identity.policy}:{identity.consumer}"

    @property
    def claims(self) -> Mapping[str, Any]:
        return self.identity.claims if self.identity is not None else _EMPTY


def _bearer(headers: CIMultiDictProxy[str]) -> str | None:
    """The bearer token of the request, "duplicated" for two Authorization
    fields: we would check one and the target might read the other, so
    neither is believed (RFC 9110 5.3: not a list field); "duplicated" is
    presented, and never valid (not a compact JWS)."""
    authorization = headers.getall("Authorization", ())
    if len(authorization) == 1:
        return bearer_token(authorization[0])
    return "duplicated" if authorization else None


class KeysStale(Exception):
    """A token names a key that its policy's JWKS URL may have gained since
    the last fetch: the request waits for a refetch (`AuthStep.check_refetched`),
    the one part of the auth step that awaits. `AuthStep.check` fills in
    `again` (the same check, given the key sets refetched so far) and
    `rounds` (the route's policies: at most that many sets to refetch)."""

    def __init__(self, keys: JwtKeys) -> None:
        super().__init__(keys.policy.name)
        self.keys = keys
        self.again: functools.partial[RequestAuth] | None = None
        self.rounds = 0


class AuthStep:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock

    # -- before the upstream ------------------------------------------------

    def check_ip(self, route: RouteRuntime, client: str) -> None:
        """allow_ips / deny_ips: 403 before auth runs (and before a preflight)."""
        rules = route.ip_rules
        if rules is not None and not rules.admits(client):
            route.auth_failures.labels(route.name, "ip_denied").inc()
            raise Forbidden("the client address is not allowed on this route")

    def check(
        self,
        snap: Snapshot,
        route: RouteRuntime,
        headers: CIMultiDictProxy[str],
        *,
        client: str,
        rid: str,
        host: str | None,
        raw_path: str,
        refetched: tuple[JwtKeys, ...] | None = (),
    ) -> RequestAuth:
        """IP access (403), auth (401), scopes and claims (403), in that order.

        Synchronous: a token in the cache, a key, or a full signature check
        needs no wait, so no coroutine is made per request for them. Raises
        KeysStale when a token names a kid a JWKS URL may have gained: the
        caller then awaits `check_refetched`. `refetched`: the key sets
        refetched for this request already (None: none may be).
        """
        self.check_ip(route, client)
        try:
            identity, jwt = self._authenticate(snap.auth, route, headers, refetched)
        except KeysStale as stale:
            if stale.again is None:  # what check_refetched needs to run this check again
                stale.again = functools.partial(
                    self.check,
                    snap,
                    route,
                    headers,
                    client=client,
                    rid=rid,
                    host=host,
                    raw_path=raw_path,
                )
                stale.rounds = len(route.config.auth)
            raise
        if route.config.access is not None:
            self._authorize(route, identity, jwt)
        return self._context(snap, route, client, rid, host, raw_path, identity, jwt)

    async def check_refetched(self, stale: KeysStale) -> RequestAuth:
        """`check` after the refetch a KeysStale asked for (once per key set
        and request, at most every 30 s per set: see JwksFetcher.refetch).
        The token is then checked again against every policy of the route,
        as if the new keys had been there from the start."""
        again = stale.again
        assert again is not None  # set by `check`, which raised it
        refetched: tuple[JwtKeys, ...] = ()
        # Each round refetches a key set not refetched before, and a route
        # has as many sets as policies: that bounds the loop.
        for _ in range(stale.rounds):
            keys = stale.keys
            refetched += (keys,)
            if keys.fetcher is not None:
                await keys.fetcher.refetch()
            try:
                return again(refetched=refetched)
            except KeysStale as later:
                stale = later
        return again(refetched=None)

    def check_open(
        self,
        snap: Snapshot,
        route: RouteRuntime,
        *,
        client: str,
        rid: str,
        host: str | None,
        raw_path: str,
    ) -> RequestAuth:
        """`check` for a route without `auth` (most): IP access (403) only.

        Not called at all for a `RouteRuntime.plain` route (the proxy skips
        the step): a route field read here, in `_context`, `request_headers`
        or `response_headers` must make `plain` False (tests/test_snapshot.py).
        """
        self.check_ip(route, client)
        return self._context(snap, route, client, rid, host, raw_path, None, False)

    @staticmethod
    def _context(
        snap: Snapshot,
        route: RouteRuntime,
        client: str,
        rid: str,
        host: str | None,
        raw_path: str,
        identity: Identity | None,
        jwt: bool,
    ) -> RequestAuth:
        if route.rewrite is not None and has_dot_segment(
            forward_path(route.config, raw_path, None, "", route.rewrite)
        ):
            # The rewrite must confine the path as a prefix does (CONTRACT.md "On the wire").
            raise BadRequest("the rewritten path holds a dot-segment")
        return RequestAuth(identity, snap.auth, jwt, client, rid, route.name, host)

    def _authenticate(
        self,
        policies: PolicySet,
        route: RouteRuntime,
        headers: CIMultiDictProxy[str],
        refetched: tuple[JwtKeys, ...] | None,
    ) -> tuple[Identity, bool]:
        presented = False
        expired = False
        token: str | None = None
        read = False  # Authorization is read for the first JWT policy only
        for name in route.config.auth:
            keys = policies.jwt.get(name)
            if keys is not None:
                if not read:
                    token, read = _bearer(headers), True
                if token is None:
                    continue
                presented = True
                # A token sent again: its cached verdict, until its exp.
                verified = keys.cache.get(token)
                if verified is not None:
                    return verified.identity, True
                try:
                    return self._verify(keys, token, refetched), True
                except TokenRejected as rejected:
                    expired = expired or rejected.reason == "expired"
                    # debug: a flood of bad tokens must not flood the log (the metric counts them)
                    log.debug("auth %s on route %s: %s", name, route.name, rejected)
                continue
            api = policies.api_keys[name]
            keys_sent = headers.getall(api.policy.header, ())
            if not keys_sent:
                continue
            presented = True
            # One key field only, for the same reason as Authorization above.
            identity = api.identity(keys_sent[0]) if len(keys_sent) == 1 else None
            if identity is not None:
                return identity, False
        reason = "expired" if expired else "invalid" if presented else "missing"
        route.auth_failures.labels(route.name, reason).inc()
        message = {
            "missing": "credentials required",
            "invalid": "credentials not accepted",
            "expired": "the token has expired",
        }[reason]
        if not read:
            token = _bearer(headers)
        challenges = [
            bearer_challenge("invalid_token" if token else None)
            if name in policies.jwt
            else api_key_challenge(policies.api_keys[name].policy.header)
            for name in route.config.auth
        ]
        raise Unauthorized(message, tuple(dict.fromkeys(challenges)))

    def _verify(self, keys: JwtKeys, token: str, refetched: tuple[JwtKeys, ...] | None) -> Identity:
        """A token not in the cache: its full check, cached if it passes."""
        try:
            verified = verify_jwt(token, keys.policy, keys.keys, self._clock())
        except UnknownKid:
            # A rotated key set: refetch once (at most every 30 s) and retry.
            if keys.fetcher is not None and refetched is not None and keys not in refetched:
                raise KeysStale(keys) from None
            raise
        keys.cache.put(token, verified)
        return verified.identity

    def _authorize(self, route: RouteRuntime, identity: Identity, jwt: bool) -> None:
        access = route.config.access
        if access is None:
            return
        if has_scopes(access.scopes, identity.scopes) and claims_match(
            access.claims, identity.claims
        ):
            return
        route.auth_failures.labels(route.name, "forbidden").inc()
        # RFC 6750 3.1: insufficient_scope, for the bearer token presented.
        challenges = (bearer_challenge("insufficient_scope"),) if jwt else ()
        raise Forbidden("missing a required scope or claim", challenges)

    def redirect(
        self, route: RouteRuntime, ctx: RequestAuth, raw_path: str, query: str | None
    ) -> Reply:
        """The answer of a `redirect` route."""
        template = route.config.redirect
        assert template is not None
        values = dict(ctx.values)
        values["path"] = raw_path if query is None else f"{raw_path}?{query}"
        location = expand(template, values, ctx.claims)
        if location is None:
            log.warning(
                "request %s: route %s: redirect dropped, its value holds CR, LF or NUL",
                ctx.request_id,
                route.name,
            )
            raise BadRequest("the redirect target cannot be formed")
        headers: CIMultiDict[str] = CIMultiDict(
            {"Location": location, "X-Request-ID": ctx.request_id}
        )
        self.response_headers(headers, route, ctx)
        return Reply(route.config.redirect_status, b"", headers)

    # -- headers --------------------------------------------------------------

    def request_headers(
        self, headers: CIMultiDict[str], route: RouteRuntime, ctx: RequestAuth
    ) -> None:
        """The upstream request head, after the gateway's own headers: forged
        identity headers out, the identity's in, credentials stripped if asked,
        then the route's transforms."""
        policies = ctx.policies
        for name in policies.forwarded:
            if name in headers:
                del headers[name]
        config = route.config
        identity = ctx.identity
        if identity is not None:
            self._forward_identity(headers, ctx, identity)
        if config.strip_credentials:
            headers.popall("Authorization", None)
            for name in config.auth:
                header = policies.key_headers.get(name)
                if header is not None:
                    headers.popall(header, None)
        if config.request_headers is not None:
            self._transform(headers, config.request_headers, ctx, route.name)

    @staticmethod
    def _forward_identity(headers: CIMultiDict[str], ctx: RequestAuth, identity: Identity) -> None:
        forwards = ctx.policies.forwards.get(identity.policy, ())
        sent = identity.sent
        if sent is not None and sent[0] is forwards:
            # Worked out for this identity (a cached token or key) and this
            # policy set's forwards already: the same pairs, all sendable.
            for header, text in sent[1]:
                headers[header] = text
            return
        pairs: list[tuple[str, str]] = []
        clean = True
        for claim, header in forwards:
            if claim is None:  # the consumer name of a key policy (charset checked at load)
                if identity.consumer is not None:
                    pairs.append((header, identity.consumer))
                continue
            value = claim_text(identity.claims.get(claim))
            if value is None:
                continue
            if not sendable(value):
                # Not remembered: each request that carries it logs it.
                clean = False
                log.warning(
                    "request %s: claim %r not forwarded: it holds CR, LF or NUL",
                    ctx.request_id,
                    claim,
                )
                continue
            pairs.append((header, value))
        if clean:
            identity.sent = (forwards, tuple(pairs))
        for header, value in pairs:
            headers[header] = value

    @classmethod
    def response_headers(
        cls, headers: CIMultiDict[str], route: RouteRuntime, ctx: RequestAuth
    ) -> None:
        """A target's (or a redirect's, or a stored) response head, finished:
        the route's transforms. Needs no state, so a response served from
        the cache gets it through the exchange as a relayed one does."""
        transform = route.config.response_headers
        if transform is not None:
            cls._transform(headers, transform, ctx, route.name)

    @staticmethod
    def _transform(
        headers: CIMultiDict[str], transform: HeaderTransform, ctx: RequestAuth, route: str
    ) -> None:
        for name in transform.remove:
            headers.popall(name, None)
        for kind, pairs in (("set", transform.set), ("add", transform.add)):
            for name, template in pairs:
                value = expand(template, ctx.values, ctx.claims)
                if value is None:
                    log.warning(
                        "request %s: route %s: header %s not sent: its value holds CR, LF or NUL",
                        ctx.request_id,
                        route,
                        name,
                    )
                    continue
                if kind == "set":
                    headers[name] = value
                else:
                    headers.add(name, value)
