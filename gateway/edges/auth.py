"""The identity step of the handler: IP access, auth, scopes and claims,
forwarded identity headers, header transforms and redirects.

The proxy calls it at four points (see proxy.py, each marked `# auth hook`):
`check()` after routing (403 / 401 / 403 in the contract's order),
`request_headers()` once the upstream request head is built,
`response_headers()` once a target's response head is finished, and
`redirect()` for a route that answers with one instead of an upstream.
"""

from __future__ import annotations

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

    __slots__ = ("identity", "jwt", "policies", "values")

    def __init__(
        self,
        identity: Identity | None,
        values: dict[str, str],
        policies: PolicySet,
        jwt: bool,
    ) -> None:
        self.identity = identity
        self.values = values
        self.policies = policies
        self.jwt = jwt  # the identity came from a JWT policy

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

    async def check(
        self,
        snap: Snapshot,
        route: RouteRuntime,
        headers: CIMultiDictProxy[str],
        *,
        client: str,
        rid: str,
        host: str | None,
        raw_path: str,
    ) -> RequestAuth:
        """IP access (403), auth (401), scopes and claims (403), in that order."""
        self.check_ip(route, client)
        identity: Identity | None = None
        jwt = False
        if route.config.auth:
            identity, jwt = await self._authenticate(snap.auth, route, headers)
            self._authorize(route, identity, jwt)
        return self._context(snap, route, client, rid, host, raw_path, identity, jwt)

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
        """`check` for a route without `auth` (most): IP access (403) only,
        and no coroutine on the request path for it."""
        self.check_ip(route, client)
        return self._context(snap, route, client, rid, host, raw_path, None, False)

    def _context(
        self,
        snap: Snapshot,
        route: RouteRuntime,
        client: str,
        rid: str,
        host: str | None,
        raw_path: str,
        identity: Identity | None,
        jwt: bool,
    ) -> RequestAuth:
        config = route.config
        if route.rewrite is not None and has_dot_segment(
            forward_path(config, raw_path, None, "", route.rewrite)
        ):
            # The rewrite must confine the path as a prefix does (CONTRACT.md "On the wire").
            raise BadRequest("the rewritten path holds a dot-segment")
        values = {
            "client_ip": client,
            "request_id": rid,
            "route": route.name,
            "host": host or "",
            "consumer": identity.consumer or "" if identity is not None else "",
        }
        return RequestAuth(identity, values, snap.auth, jwt)

    async def _authenticate(
        self, policies: PolicySet, route: RouteRuntime, headers: CIMultiDictProxy[str]
    ) -> tuple[Identity, bool]:
        presented = False
        expired = False
        challenges: list[str] = []
        authorization = headers.getall("Authorization", ())
        # Two Authorization fields: we would check one and the target might
        # read the other; neither is believed (RFC 9110 5.3: not a list field).
        token = bearer_token(authorization[0]) if len(authorization) == 1 else None
        if len(authorization) > 1:
            token = "duplicated"  # presented, and never valid (not a compact JWS)
        for name in route.config.auth:
            keys = policies.jwt.get(name)
            if keys is not None:
                challenges.append(bearer_challenge("invalid_token" if token else None))
                if token is None:
                    continue
                presented = True
                try:
                    return await self._verify(keys, token), True
                except TokenRejected as rejected:
                    expired = expired or rejected.reason == "expired"
                    # debug: a flood of bad tokens must not flood the log (the metric counts them)
                    log.debug("auth %s on route %s: %s", name, route.name, rejected)
                continue
            policy, table = policies.api_keys[name]
            challenges.append(api_key_challenge(policy.header))
            keys_sent = headers.getall(policy.header, ())
            if not keys_sent:
                continue
            presented = True
            # One key field only, for the same reason as Authorization above.
            consumer = table.find(keys_sent[0]) if len(keys_sent) == 1 else None
            if consumer is not None:
                return Identity(name, consumer.name, frozenset(consumer.scopes), {}), False
        reason = "expired" if expired else "invalid" if presented else "missing"
        route.auth_failures.labels(route.name, reason).inc()
        message = {
            "missing": "credentials required",
            "invalid": "credentials not accepted",
            "expired": "the token has expired",
        }[reason]
        raise Unauthorized(message, tuple(dict.fromkeys(challenges)))

    async def _verify(self, keys: JwtKeys, token: str) -> Identity:
        cache = keys.cache
        cache_key = cache.key(token)
        verified = cache.get(cache_key)
        if verified is None:
            try:
                verified = verify_jwt(token, keys.policy, keys.keys, self._clock())
            except UnknownKid:
                # A rotated key set: refetch once (at most every 30 s) and retry.
                if keys.fetcher is None or not await keys.fetcher.refetch():
                    raise
                verified = verify_jwt(token, keys.policy, keys.keys, self._clock())
            cache.put(cache_key, verified)
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
                ctx.values["request_id"],
                route.name,
            )
            raise BadRequest("the redirect target cannot be formed")
        headers: CIMultiDict[str] = CIMultiDict(
            {"Location": location, "X-Request-ID": ctx.values["request_id"]}
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
        for claim, header in forwards:
            if claim is None:  # the consumer name of a key policy (charset checked at load)
                if identity.consumer is not None:
                    headers[header] = identity.consumer
                continue
            value = claim_text(identity.claims.get(claim))
            if value is None:
                continue
            if not sendable(value):
                log.warning(
                    "request %s: claim %r not forwarded: it holds CR, LF or NUL",
                    ctx.values["request_id"],
                    claim,
                )
                continue
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
                        ctx.values["request_id"],
                        route,
                        name,
                    )
                    continue
                if kind == "set":
                    headers[name] = value
                else:
                    headers.add(name, value)
