"""Per-route CORS: the Fetch standard's CORS protocol, preflights answered here.

Why not aiohttp-cors (0.8): it keys every policy by the `Resource`/`Route`
objects of a `web.Application` router and wires itself in at setup time,
through `resource.add_route("OPTIONS", ...)` and `app.on_response_prepare`.
Our proxy listener is not aiohttp at all (gateway/h1server.py), and even on
an Application the router and signals are frozen once it starts ("Cannot
register a resource into frozen router", "Cannot modify frozen list"), so a
route added by a SIGHUP reload could never get a policy. A single catch-all
resource does not help: `cors.add()` refuses a resource with a `*` method
route ("already has a '*' handler for all methods"), one resource carries one
policy for every route, and a custom `router_adapter` would still need its
private `_preflight_handler` called by hand. It would also fight a proxy:
its response hook `assert`s the handler set no Access-Control-* header (a
target doing its own CORS trips it), and it refuses preflights with 403.

So `CorsPolicy` is a plain value built once per route per config snapshot
(it swaps with the snapshot on reload, no state to carry over), and the
handler asks it for header lists. Section numbers below are the Fetch living
standard's (https://fetch.spec.whatwg.org/): §2.2.1 Methods, §2.2.2 Headers,
§3.3 CORS protocol (§3.3.2 requests, §3.3.3 responses, §3.3.5 credentials),
§4.8 CORS-preflight fetch, §4.10 CORS check, and the background section
"CORS protocol and HTTP caches" (#cors-protocol-and-http-caches).

Decisions:

- A refused preflight (origin, method or a header not allowed) gets the same
  204 as an allowed one, only without any Access-Control-Allow-* header. The
  browser fails the CORS check on the missing header whatever the status
  (§4.8, §4.10), and CORS is not access control: a non-browser client skips
  the preflight. 204 is what rs/cors answers and what nginx's `return 204`
  idiom gives; it keeps DevTools' message on the real cause ("No
  Access-Control-Allow-Origin header") instead of "does not have HTTP ok
  status", and a 403 would read as enforcement it is not.
- `"*"` in the config means what `*` means on the wire (§3.3.3): every name
  but `Authorization` (a CORS non-wildcard request-header name, §2.2.2),
  which must be listed, as with nginx, Envoy or Traefik passing `*` through.
  With credentials the browser reads `*` literally (§3.3.5), so the policy
  echoes the request's origin / method / header names instead.
- CORS-safelisted methods (GET, HEAD, POST) are always allowed (§4.8 skips
  them). The safelisted header names (Accept, Accept-Language,
  Content-Language, Content-Type) are always allowed and always listed in
  Access-Control-Allow-Headers: a browser only asks for one when its value is
  outside the safelist (`Content-Type: application/json`), and a JSON API
  behind an allowed origin should not need `allow_headers = ["Content-Type"]`.
- Methods compare case-sensitively (§2.2.1: methods are case-sensitive; the
  config upper-cases them). The requested method is first normalized like a
  browser normalizes its own (DELETE, GET, HEAD, OPTIONS, POST, PUT), so
  `patch` is refused but `put` is PUT. Header names compare ignoring case.
- Origins compare ignoring case and a default port; the allowed origin is
  echoed byte for byte, since §4.10 compares the header to the browser's own
  serialization.
- Vary (background "CORS protocol and HTTP caches"): preflights always vary
  on Origin, Access-Control-Request-Method, Access-Control-Request-Headers.
  Actual responses vary on Origin whenever the answer depends on it, *also*
  when the request had no Origin: otherwise a cache stores the header-less
  answer to a navigation and serves it to a later CORS request. With
  `allow_origins = ["*"]` and no credentials nothing depends on Origin, so
  the spec's other advice applies: `Access-Control-Allow-Origin: *` on every
  response, with or without Origin, and no Vary.

Caller's duties (the handler, `proxy.py`): answer `is_preflight` requests on
a route with `cors` from `preflight()` without reaching a target (match the
route ignoring its `methods`, since OPTIONS is rarely listed); forward other
OPTIONS like any request. On every response of such a route, the gateway's
own errors (429, 503, ...) included so that scripts can read them, apply
`response_headers()` with `merge_headers()`. Dropping every Access-Control-*
header the target sent is right: the route's policy must have one source,
a target echoing any origin would undo the allow-list, and a second
Access-Control-Allow-Origin value fails the browser's check (§4.10) anyway.
Vary is a list, so it is merged, never overwritten. Routes without `cors`
pass the target's headers through untouched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

from multidict import CIMultiDict

from gateway.core.config import CorsConfig

__all__ = ["PREFLIGHT_STATUS", "CorsPolicy", "is_preflight", "merge_headers"]

PREFLIGHT_STATUS: Final = 204

# §2.2.1: CORS-safelisted methods never need to be allowed by a preflight.
_SAFELISTED_METHODS: Final = frozenset({"GET", "HEAD", "POST"})
# §2.2.1 "normalize": the only methods a browser upper-cases for the page.
_NORMALIZED_METHODS: Final = frozenset({"DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT"})
# §2.2.2 CORS-safelisted request-header names (their values are checked by the
# browser; Range is left out: only a single `bytes=` range is safelisted).
_SAFELISTED_HEADERS: Final = ("Accept", "Accept-Language", "Content-Language", "Content-Type")
# §2.2.2 CORS non-wildcard request-header name: `*` never covers it.
_NON_WILDCARD_HEADER: Final = "authorization"
# RFC 9110 §5.6.2: token = 1*tchar (methods and field names are tokens).
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What a browser puts in Origin for a tuple origin (scheme://host[:port]);
# "null" (opaque origins) deliberately does not match.
_SERIALIZED_ORIGIN: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#,]+")
_DEFAULT_PORTS: Final = {"http": ":80", "https": ":443"}

_PREFLIGHT_VARY: Final = (
    "Vary",
    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
)
_VARY_ORIGIN: Final = ("Vary", "Origin")
_ALLOW_CREDENTIALS: Final = ("Access-Control-Allow-Credentials", "true")  # §3.3.5: only `true`


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    """A CORS-preflight request (§3.3.2): OPTIONS with Origin and Access-Control-Request-Method.

    `headers` must look names up ignoring case (aiohttp's `request.headers`).
    """
    return (
        method == "OPTIONS" and "Origin" in headers and "Access-Control-Request-Method" in headers
    )


def _origin_key(origin: str) -> str:
    """An origin as compared: scheme and host lower-cased (RFC 6454 §4), no default port."""
    key = origin.lower()
    scheme = key.partition("://")[0]
    default_port = _DEFAULT_PORTS.get(scheme)
    if default_port is not None and key.endswith(default_port):
        key = key.removesuffix(default_port)
    return key


def _unique(names: Iterable[str]) -> list[str]:
    """Names without case-insensitive repeats, first spelling and order kept."""
    seen: dict[str, str] = {}
    for name in names:
        seen.setdefault(name.lower(), name)
    return list(seen.values())


class CorsPolicy:
    """One route's `cors` table, every header value precomputed once per config."""

    __slots__ = (
        "_allow_headers",
        "_allow_methods",
        "_any_header",
        "_any_method",
        "_any_origin",
        "_credentials",
        "_headers",
        "_max_age",
        "_methods",
        "_origins",
        "_static",
        "_static_star",
    )

    def __init__(self, config: CorsConfig) -> None:
        self._credentials: Final = config.allow_credentials
        self._any_origin: Final = "*" in config.allow_origins
        self._origins: Final = frozenset(
            _origin_key(origin) for origin in config.allow_origins if origin != "*"
        )
        # §3.3.5/§4.10: `Access-Control-Allow-Origin: *` only works without
        # credentials (config.py refuses the pair; a hand-built config echoes).
        self._static_star: Final = self._any_origin and not self._credentials

        self._any_method: Final = "*" in config.allow_methods
        self._methods: Final = frozenset(config.allow_methods) - {"*"}
        if self._any_method and not self._credentials:
            allow_methods = "*"
        else:
            # Empty means "send none": §4.8 then admits the safelisted methods only.
            allow_methods = ", ".join(m for m in config.allow_methods if m != "*")
        self._allow_methods: Final = allow_methods

        self._any_header: Final = "*" in config.allow_headers
        explicit = _unique(name for name in config.allow_headers if name != "*")
        self._headers: Final = frozenset(name.lower() for name in (*explicit, *_SAFELISTED_HEADERS))
        if self._any_header and not self._credentials:
            # `*` covers the safelisted names too; Authorization stays listed if given.
            allow_headers = ", ".join(["*", *explicit])
        else:
            allow_headers = ", ".join(_unique([*explicit, *_SAFELISTED_HEADERS]))
        self._allow_headers: Final = allow_headers

        # §3.3.3: delta-seconds; rounded down so a preflight is never cached
        # longer than configured (browsers cap it further: 2 h in Chromium).
        self._max_age: Final = None if config.max_age is None else str(int(config.max_age))

        expose = _unique(config.expose_headers)
        if self._credentials:
            # §3.3.5: with credentials `*` would be a header literally named "*".
            expose = [name for name in expose if name != "*"]
        static: list[tuple[str, str]] = []
        if self._credentials:
            static.append(_ALLOW_CREDENTIALS)
        if expose:
            static.append(("Access-Control-Expose-Headers", ", ".join(expose)))
        # What every allowed actual response carries besides the origin.
        self._static: Final = tuple(static)

    def _allow_origin(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for this Origin, or None when refused."""
        if origin is None:
            return None
        if self._static_star:
            return "*"
        if self._any_origin:
            # Credentials with "*" configured: echo, but never "null" or junk,
            # which would hand credentialed reads to sandboxed documents.
            return origin if _SERIALIZED_ORIGIN.fullmatch(origin) else None
        return origin if _origin_key(origin) in self._origins else None

    def _method_allowed(self, method: str) -> bool:
        return (
            method in _SAFELISTED_METHODS
            or method in self._methods
            or (self._any_method and _TOKEN.fullmatch(method) is not None)
        )

    def _header_allowed(self, name: str) -> bool:
        # `name` is lower-cased; §4.8 compares header names byte-case-insensitively.
        return name in self._headers or (
            self._any_header and name != _NON_WILDCARD_HEADER and _TOKEN.fullmatch(name) is not None
        )

    def preflight(self, headers: Mapping[str, str]) -> tuple[int, list[tuple[str, str]]]:
        """Status and headers answering a preflight (`is_preflight` was true).

        Always 204 with the Vary line; the Access-Control-Allow-* headers only
        when the origin, the requested method and every requested header are
        allowed (see the module docstring for why not 403).
        """
        refused = (PREFLIGHT_STATUS, [_PREFLIGHT_VARY])
        allow_origin = self._allow_origin(headers.get("Origin"))
        if allow_origin is None:
            return refused
        method = headers.get("Access-Control-Request-Method", "").strip(" \t")
        if method.upper() in _NORMALIZED_METHODS:
            method = method.upper()
        if not self._method_allowed(method):
            return refused
        # §3.3.2: a sorted, lower-cased, comma-separated list; RFC 9110 §5.6.1
        # asks recipients to skip empty list elements.
        requested = _unique(
            name.strip(" \t").lower()
            for name in headers.get("Access-Control-Request-Headers", "").split(",")
            if name.strip(" \t")
        )
        if not all(self._header_allowed(name) for name in requested):
            return refused

        answer = [("Access-Control-Allow-Origin", allow_origin)]
        if self._credentials:
            answer.append(_ALLOW_CREDENTIALS)
        allow_methods = self._allow_methods
        if (
            self._any_method
            and self._credentials
            and method not in self._methods | _SAFELISTED_METHODS
        ):
            # §3.3.5: `*` is literal here, so name the method asked for.
            allow_methods = ", ".join(filter(None, (allow_methods, method)))
        if allow_methods:
            answer.append(("Access-Control-Allow-Methods", allow_methods))
        allow_headers = self._allow_headers
        if self._any_header and self._credentials:
            extra = [name for name in requested if name not in self._headers]
            allow_headers = ", ".join([allow_headers, *extra])
        answer.append(("Access-Control-Allow-Headers", allow_headers))
        if self._max_age is not None:
            answer.append(("Access-Control-Max-Age", self._max_age))
        answer.append(_PREFLIGHT_VARY)
        return PREFLIGHT_STATUS, answer

    def response_headers(self, headers: Mapping[str, str]) -> list[tuple[str, str]]:
        """CORS headers for the response to an actual (non-preflight) request.

        `headers` are the request's. The list goes through `merge_headers()`.
        """
        if self._static_star:
            # Same answer for every requester: send it always, no Vary
            # (background "CORS protocol and HTTP caches").
            return [("Access-Control-Allow-Origin", "*"), *self._static]
        allow_origin = self._allow_origin(headers.get("Origin"))
        if allow_origin is None:
            # Vary even without Origin, so a cache never hands this
            # header-less answer to a CORS request.
            return [_VARY_ORIGIN]
        return [("Access-Control-Allow-Origin", allow_origin), *self._static, _VARY_ORIGIN]


def merge_headers(response: CIMultiDict[str], cors_headers: Iterable[tuple[str, str]]) -> None:
    """Put `cors_headers` into a proxied response's headers, in place.

    Every Access-Control-* the target sent is dropped first (the route's
    policy is the only one); Vary tokens are added to the target's Vary
    rather than replacing it (RFC 9110 §12.5.5), and `Vary: *` is left alone.
    """
    for name in {name.lower() for name in response if name.lower().startswith("access-control-")}:
        del response[name]
    for name, value in cors_headers:
        if name.lower() != "vary":
            response.add(name, value)
            continue
        tokens = _unique(
            token.strip(" \t") for line in response.getall("Vary", ()) for token in line.split(",")
        )
        tokens = [token for token in tokens if token]
        if "*" in tokens:
            continue
        known = {token.lower() for token in tokens}
        tokens.extend(
            token
            for token in (t.strip(" \t") for t in value.split(","))
            if token.lower() not in known
        )
        response["Vary"] = ", ".join(tokens)
