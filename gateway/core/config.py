"""routes.toml decoded into frozen msgspec Structs.

`load(path)` / `parse(text)` return one immutable `Config` or raise
`ConfigError` carrying *every* problem found, each naming its key path
(`routes[2] ("users-api").upstream: unknown upstream "userz"`), then, where
they can be found, the line the key is on and the nearest valid spelling:
`... unknown upstream "userz" (line 14); did you mean "users"?`.

The Structs below are the *resolved* view: `[defaults]` already folded into
every route, targets normalised to `TargetConfig`, tuples instead of lists.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal, TypeVar, get_args

import msgspec
import yarl
from msgspec import UNSET, UnsetType

from gateway.core.auth import (
    HMAC_ALGORITHMS,
    JWT_ALGORITHMS,
    AccessConfig,
    ApiKeyPolicy,
    AuthPolicy,
    HeaderTransform,
    JwtPolicy,
    RewriteConfig,
    Template,
    parse_cidr,
    parse_jwks,
    parse_keys_file,
    parse_template,
)
from gateway.core.certfiles import certificate_names, check_ca_file, check_pair
from gateway.core.tomllines import key_lines, line_of

BalancerName = Literal["round_robin", "weighted", "least_connections", "ip_hash"]
AccessLogFormat = Literal["json", "text", "off"]
TLSVersion = Literal["1.2", "1.3"]
LimitStore = Literal["local", "redis"]
DiscoveryKind = Literal["dns", "srv"]

DEFAULT_CONFIG_PATH: Final = "routes.toml"
# More processes than this is a typo (workers = 10000), not a plan.
MAX_WORKERS: Final = 256


class ConfigError(Exception):
    """Every problem found in one config file; `errors` are `key.path: message` lines."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class CertificateConfig(msgspec.Struct, frozen=True, kw_only=True):
    cert: str
    key: str
    # The SNI names it serves, lower-cased; from the certificate's DNS names
    # when the config names none ("*.example.com" covers one label).
    hosts: tuple[str, ...] = ()


class ServerTLSConfig(msgspec.Struct, frozen=True, kw_only=True):
    min_version: TLSVersion = "1.2"


class UpstreamTLSConfig(msgspec.Struct, frozen=True, kw_only=True):
    verify: bool = True
    ca_file: str | None = None
    server_name: str | None = None
    cert: str | None = None
    key: str | None = None


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True):
    listen: tuple[str, ...] = ("127.0.0.1:8080",)
    # Positions in `listen` of the entries written `{ address = ..., tls = true }`.
    tls_listen: tuple[int, ...] = ()
    certificates: tuple[CertificateConfig, ...] = ()
    tls: ServerTLSConfig = ServerTLSConfig()
    admin: str = "127.0.0.1:9901"
    drain_timeout: float = 30.0
    trusted_proxies: tuple[str, ...] = ()
    access_log: AccessLogFormat = "json"
    client_timeout: float = 30.0
    # Admin API (docs/operator-tools.md): the environment variable holding the
    # bearer token every admin POST needs ("" = no token), and the browser
    # origins allowed to call the admin API.
    admin_token_env: str = ""
    admin_cors_origins: tuple[str, ...] = ()
    workers: int = 1  # processes serving the listeners; 0 = one per CPU


class TargetConfig(msgspec.Struct, frozen=True, kw_only=True):
    url: str  # exactly as written in the config: the identity of the target
    weight: int = 1


class DiscoveryConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A `{ dns = "host:port" }` or `{ srv = "_service._proto.name" }` target:
    the addresses it resolves to are the targets (see CONTRACT.md "Service
    discovery"); `written` is the value as in the file, for logs and errors."""

    kind: DiscoveryKind
    name: str  # the DNS name looked up, lower-cased, without a trailing dot
    port: int = 0  # dns: the port every address gets; srv: from the records
    weight: int = 1  # dns: every address's weight; srv: from the records
    scheme: str = "http"
    written: str = ""


class HealthConfig(msgspec.Struct, frozen=True, kw_only=True):
    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3


class BreakerConfig(msgspec.Struct, frozen=True, kw_only=True):
    failures: int = 5
    cooldown: float = 5.0
    max_cooldown: float = 60.0


class UpstreamConfig(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    balancer: BalancerName = "round_robin"
    targets: tuple[TargetConfig, ...]
    health: HealthConfig | None = None
    # Without a [breaker] table the defaults apply: the breaker is the
    # passive check every upstream has (as nginx's max_fails/fail_timeout).
    breaker: BreakerConfig = BreakerConfig()
    panic_threshold: float = 0.5
    tls: UpstreamTLSConfig | None = None
    discover: tuple[DiscoveryConfig, ...] = ()  # the dns/srv items of `targets`
    dns_refresh: float = 10.0
    nameservers: tuple[str, ...] = ()  # "ip" or "ip:port"; () = resolv.conf


class RateLimitConfig(msgspec.Struct, frozen=True, kw_only=True):
    rate: float
    burst: int
    key: str = "client_ip"  # "client_ip" | "route" | "header:NAME"
    store: LimitStore = "local"


class RedisConfig(msgspec.Struct, frozen=True, kw_only=True):
    url: str = "redis://127.0.0.1:6379/0"
    timeout: float = 0.05  # per command: no request waits longer on Redis


class CorsConfig(msgspec.Struct, frozen=True, kw_only=True):
    allow_origins: tuple[str, ...] = ("*",)
    allow_methods: tuple[str, ...] = ("GET", "HEAD", "POST")
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    allow_credentials: bool = False
    max_age: float | None = None


class CacheConfig(msgspec.Struct, frozen=True, kw_only=True):
    """`[cache]`: the one shared in-memory response store."""

    max_bytes: int = 268435456  # stored heads and bodies, all routes together
    max_entry_bytes: int = 8388608  # a larger response streams through, not stored


class RouteCacheConfig(msgspec.Struct, frozen=True, kw_only=True):
    """`[routes.cache]`: the route opts in to the shared cache."""

    ttl: float = 60.0  # freshness when the response states none
    stale_if_error: float = 0.0  # RFC 5861: seconds a stale entry may stand in for a failure


class RouteConfig(msgspec.Struct, frozen=True, kw_only=True):
    index: int  # position in the file, for tie-breaks and error paths
    name: str
    upstream: str
    path: str | None = None
    path_regex: str | None = None
    host: str | None = None
    methods: tuple[str, ...] | None = None  # upper-cased; None = all
    headers: tuple[tuple[str, str], ...] = ()  # names lower-cased
    strip_prefix: bool = False
    preserve_host: bool = True
    priority: int = 0
    # resolved from [defaults] when the route does not set them
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_body_bytes: int = 0
    retries: int = 0
    tunnel_idle_timeout: float = 300.0
    websocket: bool = True
    rate_limit: RateLimitConfig | None = None
    cors: CorsConfig | None = None
    # Identity and access (CONTRACT.md "Identity and access")
    auth: tuple[str, ...] = ()  # policy names; any one may accept
    strip_credentials: bool = False
    access: AccessConfig | None = None
    # Transforms (CONTRACT.md "Header transforms, rewrites, redirects")
    request_headers: HeaderTransform | None = None
    response_headers: HeaderTransform | None = None
    rewrite: RewriteConfig | None = None
    redirect: Template | None = None  # instead of upstream (which is then "")
    redirect_status: int = 308
    cache: RouteCacheConfig | None = None


class Config(msgspec.Struct, frozen=True, kw_only=True):
    server: ServerConfig
    upstreams: dict[str, UpstreamConfig]
    routes: tuple[RouteConfig, ...]
    cache: CacheConfig | None = None  # absent: no caching
    redis: RedisConfig | None = None
    path: str  # where it was read from ("<string>" for parse())
    sha256: str  # of the file's bytes
    auth: dict[str, AuthPolicy] = {}


# --------------------------------------------------------------------------
# Raw input: the TOML tables as written. Every field is optional here (UNSET
# when absent) so that a key dropped after a type error never causes a second,
# spurious "missing" error; required keys are checked by the loader instead.
# --------------------------------------------------------------------------


class _Raw(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class _RawServer(_Raw):
    listen: list[Any] | UnsetType = UNSET  # "host:port" or {address, tls}, one by one
    certificates: list[Any] | UnsetType = UNSET
    tls: dict[str, Any] | UnsetType = UNSET
    admin: str | UnsetType = UNSET
    drain_timeout: float | UnsetType = UNSET
    trusted_proxies: list[str] | UnsetType = UNSET
    access_log: AccessLogFormat | UnsetType = UNSET
    client_timeout: float | UnsetType = UNSET
    admin_token_env: str | UnsetType = UNSET
    admin_cors_origins: list[str] | UnsetType = UNSET
    workers: int | UnsetType = UNSET


class _RawDefaults(_Raw):
    connect_timeout: float | UnsetType = UNSET
    read_timeout: float | UnsetType = UNSET
    max_body_bytes: int | UnsetType = UNSET
    retries: int | UnsetType = UNSET
    tunnel_idle_timeout: float | UnsetType = UNSET


class _RawListen(_Raw):
    address: str | UnsetType = UNSET
    tls: bool | UnsetType = UNSET


class _RawCertificate(_Raw):
    cert: str | UnsetType = UNSET
    key: str | UnsetType = UNSET
    hosts: list[str] | UnsetType = UNSET


class _RawServerTLS(_Raw):
    min_version: TLSVersion | UnsetType = UNSET


class _RawUpstreamTLS(_Raw):
    verify: bool | UnsetType = UNSET
    ca_file: str | UnsetType = UNSET
    server_name: str | UnsetType = UNSET
    cert: str | UnsetType = UNSET
    key: str | UnsetType = UNSET


class _RawTarget(_Raw):
    url: str | UnsetType = UNSET
    dns: str | UnsetType = UNSET
    srv: str | UnsetType = UNSET
    weight: int | UnsetType = UNSET


class _RawHealth(_Raw):
    path: str | UnsetType = UNSET
    interval: float | UnsetType = UNSET
    timeout: float | UnsetType = UNSET
    healthy_threshold: int | UnsetType = UNSET
    unhealthy_threshold: int | UnsetType = UNSET


class _RawBreaker(_Raw):
    failures: int | UnsetType = UNSET
    cooldown: float | UnsetType = UNSET
    max_cooldown: float | UnsetType = UNSET


class _RawUpstream(_Raw):
    balancer: BalancerName | UnsetType = UNSET
    targets: list[Any] | UnsetType = UNSET  # items decoded one by one
    health: dict[str, Any] | UnsetType = UNSET  # decoded as its own table
    breaker: dict[str, Any] | UnsetType = UNSET
    panic_threshold: float | UnsetType = UNSET
    tls: dict[str, Any] | UnsetType = UNSET
    dns_refresh: float | UnsetType = UNSET
    nameservers: list[str] | UnsetType = UNSET


class _RawRateLimit(_Raw):
    rate: float | UnsetType = UNSET
    burst: int | UnsetType = UNSET
    key: str | UnsetType = UNSET
    store: LimitStore | UnsetType = UNSET


class _RawRedis(_Raw):
    url: str | UnsetType = UNSET
    timeout: float | UnsetType = UNSET


class _RawCors(_Raw):
    allow_origins: list[str] | UnsetType = UNSET
    allow_methods: list[str] | UnsetType = UNSET
    allow_headers: list[str] | UnsetType = UNSET
    expose_headers: list[str] | UnsetType = UNSET
    allow_credentials: bool | UnsetType = UNSET
    max_age: float | UnsetType = UNSET


class _RawCache(_Raw):
    max_bytes: int | UnsetType = UNSET
    max_entry_bytes: int | UnsetType = UNSET


class _RawRouteCache(_Raw):
    ttl: float | UnsetType = UNSET
    stale_if_error: float | UnsetType = UNSET


class _RawRoute(_RawDefaults):
    name: str | UnsetType = UNSET
    path: str | UnsetType = UNSET
    path_regex: str | UnsetType = UNSET
    host: str | UnsetType = UNSET
    methods: list[str] | UnsetType = UNSET
    headers: dict[str, Any] | UnsetType = UNSET  # values checked one by one
    upstream: str | UnsetType = UNSET
    strip_prefix: bool | UnsetType = UNSET
    preserve_host: bool | UnsetType = UNSET
    priority: int | UnsetType = UNSET
    rate_limit: dict[str, Any] | UnsetType = UNSET  # decoded as its own table
    cors: dict[str, Any] | UnsetType = UNSET
    auth: str | list[str] | UnsetType = UNSET
    strip_credentials: bool | UnsetType = UNSET
    access: dict[str, Any] | UnsetType = UNSET
    request_headers: dict[str, Any] | UnsetType = UNSET
    response_headers: dict[str, Any] | UnsetType = UNSET
    rewrite: dict[str, Any] | UnsetType = UNSET
    redirect: str | UnsetType = UNSET
    redirect_status: int | UnsetType = UNSET
    websocket: bool | UnsetType = UNSET
    cache: dict[str, Any] | UnsetType = UNSET


class _RawAuth(_Raw):
    type: Literal["jwt", "api_key"] | UnsetType = UNSET
    # jwt
    algorithms: list[str] | UnsetType = UNSET
    jwks_file: str | UnsetType = UNSET
    jwks_url: str | UnsetType = UNSET
    jwks_refresh: float | UnsetType = UNSET
    secret_env: str | UnsetType = UNSET
    issuer: str | UnsetType = UNSET
    audiences: list[str] | UnsetType = UNSET
    leeway: float | UnsetType = UNSET
    forward_claims: dict[str, str] | UnsetType = UNSET
    # api_key
    header: str | UnsetType = UNSET
    keys_file: str | UnsetType = UNSET
    forward_consumer: str | UnsetType = UNSET


_JWT_ONLY: Final = (
    "algorithms",
    "jwks_file",
    "jwks_url",
    "jwks_refresh",
    "secret_env",
    "issuer",
    "audiences",
    "leeway",
    "forward_claims",
)
_API_KEY_ONLY: Final = ("header", "keys_file", "forward_consumer")


class _RawAccess(_Raw):
    scopes: list[str] | UnsetType = UNSET
    claims: dict[str, Any] | UnsetType = UNSET
    allow_ips: list[str] | UnsetType = UNSET
    deny_ips: list[str] | UnsetType = UNSET


class _RawHeaderTransform(_Raw):
    set: dict[str, str] | UnsetType = UNSET
    add: dict[str, str] | UnsetType = UNSET
    remove: list[str] | UnsetType = UNSET


class _RawRewrite(_Raw):
    pattern: str | UnsetType = UNSET
    replace: str | UnsetType = UNSET


_TOP_LEVEL: Final = ("server", "defaults", "upstreams", "routes", "auth", "cache", "redis")
_REDIRECT_STATUSES: Final = (301, 302, 303, 307, 308)
_PLACEHOLDER_NAMES: Final = ("client_ip", "request_id", "route", "host", "consumer", "claim.NAME")
MAX_KEY_FILE_BYTES: Final = 4 << 20
_GROUP_REF: Final = re.compile(r"\\(?P<number>[0-9]+)|\\g<(?P<name>[^>]*)>")
# Headers a transform may not touch: framing and the hop's own (RFC 9112 6,
# RFC 9110 7.6.1); changing them would desynchronise the exchange.
_UNTOUCHABLE: Final = frozenset(
    {"content-length", "transfer-encoding", "connection", "host", "upgrade", "te", "trailer"}
)

# Defaults live once, on the resolved Structs above.
_SERVER: Final = ServerConfig()
# POSIX names for environment variables (what a shell can export).
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEALTH: Final = HealthConfig()
_BREAKER: Final = BreakerConfig()
_PANIC_THRESHOLD: Final = 0.5
_CORS: Final = CorsConfig()
_CACHE: Final = CacheConfig()
_ROUTE_CACHE: Final = RouteCacheConfig()
_ROUTE: Final = RouteConfig(index=0, name="", upstream="")

# Literal-typed keys: msgspec says "Invalid enum value"; we list the choices.
_CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "balancer": get_args(BalancerName),
    "access_log": get_args(AccessLogFormat),
    "type": ("jwt", "api_key"),
    "min_version": get_args(TLSVersion),
    "store": get_args(LimitStore),
}
_REDIS: Final = RedisConfig()
_UPSTREAM: Final = UpstreamConfig(name="", targets=())
_REDIS_SCHEMES: Final = ("redis", "rediss", "unix")

# RFC 9110 section 5.6.2: token = 1*tchar
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
_HOST_LABEL: Final = re.compile(r"[a-z0-9_-]+")
_PORT: Final = re.compile(r"[0-9]{1,5}")
_ORIGIN: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]+")
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_AT: Final = re.compile(r"(?P<message>.*) - at `\$(?P<where>.*)`", re.DOTALL)
_UNKNOWN: Final = re.compile(r"Object contains unknown field `(?P<key>.*)`", re.DOTALL)
_FIRST_KEY: Final = re.compile(r"\.(?P<key>[A-Za-z0-9_]+)")
# One segment of an error's key path, as `_key` and msgspec write them: `.name`,
# `."quoted name"`, `[3]`, and the ` ("route-name")` shown after `routes[N]`.
_SEGMENT: Final = re.compile(
    r'\.?(?:(?P<bare>[A-Za-z0-9_-]+)|(?P<quoted>"(?:[^"\\]|\\.)*"))'
    r'|\[(?P<index>[0-9]+)\]|(?P<label> \("(?:[^"\\]|\\.)*"\))'
)

# RFC 9110 section 9.3 and RFC 5789 (PATCH): the methods a misspelt one was meant to be.
_STANDARD_METHODS: Final = (
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
)
# The IANA HTTP Method Registry (RFC 9110 section 16.1.1), plus PURGE (Varnish,
# nginx's proxy_cache_purge): taken as written, never as a typo of a standard one
# (PROPPATCH is no misspelt PATCH).
_REGISTERED_METHODS: Final = frozenset(
    (
        *_STANDARD_METHODS,
        "ACL",
        "BASELINE-CONTROL",
        "BIND",
        "CHECKIN",
        "CHECKOUT",
        "COPY",
        "LABEL",
        "LINK",
        "LOCK",
        "MERGE",
        "MKACTIVITY",
        "MKCALENDAR",
        "MKCOL",
        "MKREDIRECTREF",
        "MKWORKSPACE",
        "MOVE",
        "ORDERPATCH",
        "PRI",
        "PROPFIND",
        "PROPPATCH",
        "QUERY",
        "REBIND",
        "REPORT",
        "SEARCH",
        "UNBIND",
        "UNCHECKOUT",
        "UNLINK",
        "UNLOCK",
        "UPDATE",
        "UPDATEREDIRECTREF",
        "VERSION-CONTROL",
        "PURGE",
    )
)
_RATE_LIMIT_KEYS: Final = ("client_ip", "route", "consumer")

_S = TypeVar("_S", bound=msgspec.Struct)
_T = TypeVar("_T")


def _key(name: str) -> str:
    """One key path segment, quoted the TOML way when it is not a bare key."""
    return name if _BARE_KEY.fullmatch(name) else _quote(name)


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _type_name(value: object) -> str:
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _tidy(message: str) -> str:
    # msgspec speaks JSON; a TOML user knows tables, not objects.
    return message.replace("`object`", "`table`")


def _or(value: _T | UnsetType, default: _T) -> _T:
    return default if isinstance(value, UnsetType) else value


def _close(word: str, choices: Iterable[str]) -> list[str]:
    """The likeliest intended spelling of `word` among `choices` (at most one)."""
    return difflib.get_close_matches(word, list(choices), n=1)


def _one_edit_apart(a: str, b: str) -> bool:
    """One insertion, deletion, substitution or swap of neighbours turns `a` into `b`.

    (Damerau-Levenshtein distance 1.) Stricter than difflib's ratio, which for words
    of three to five letters also pairs unrelated methods (FETCH and PATCH).
    """
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        return len(diff) == 1 or (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and a[diff[0]] == b[diff[1]]
            and a[diff[1]] == b[diff[0]]
        )
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def _path_segments(path: str) -> tuple[str | int, ...]:
    """An error's key path as keys and indices: `routes[2] ("x").upstream` -> routes, 2, upstream.

    Stops at the first piece it cannot read (msgspec's `[...]`), so the result
    is the path or one of its ancestors, never a different key.
    """
    segments: list[str | int] = []
    pos = 0
    while pos < len(path) and (match := _SEGMENT.match(path, pos)) and match.end() > pos:
        pos = match.end()
        if match["bare"] is not None:
            segments.append(match["bare"])
        elif match["quoted"] is not None:
            segments.append(json.loads(match["quoted"]))
        elif match["index"] is not None:
            segments.append(int(match["index"]))
    return tuple(segments)


def parse_listen_address(addr: str) -> tuple[str, int] | str:
    """`"host:port"` / `"[::1]:port"` -> `(host, port)`; `"unix:/path"` -> the path.

    Raises `ValueError` with a message fit for a config error line.
    """
    if addr.startswith("unix:"):
        path = addr.removeprefix("unix:")
        if not path:
            raise ValueError(f"invalid address {_quote(addr)}: empty unix socket path")
        return path
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise ValueError(
            f'invalid address {_quote(addr)}: expected "host:port", "[ipv6]:port" or "unix:/path"'
        )
    if not _PORT.fullmatch(port) or int(port) > 65535:
        raise ValueError(f"invalid address {_quote(addr)}: port must be 0-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid address {_quote(addr)}: bad IPv6 address") from None
    elif ":" in host:
        raise ValueError(
            f"invalid address {_quote(addr)}: an IPv6 address needs brackets, as in [::1]:8080"
        )
    elif not all(_HOST_LABEL.fullmatch(label) for label in host.lower().split(".")):
        raise ValueError(f"invalid address {_quote(addr)}: bad host {_quote(host)}")
    return host, int(port)


def _host_problem(host: str) -> str | None:
    """Why a route's `host` pattern is unusable, or None."""
    if not host:
        return "must not be empty (leave host out to match every host)"
    if host.startswith("["):
        if not host.endswith("]"):
            return "must not include a port (host matching ignores the port)"
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"bad IPv6 address {_quote(host)}"
        return None
    if ":" in host:
        return "must not include a port (host matching ignores the port)"
    if not host.isascii():
        return "must be ASCII; write an internationalised name in its xn-- (IDNA) form"
    labels = host.split(".")
    if labels == ["*"]:
        return 'a bare "*" matches every host; leave host out instead'
    for position, label in enumerate(labels):
        if label == "*":
            if position:
                return 'wildcard "*" is allowed only as the first label, as in "*.example.com"'
        elif "*" in label:
            return 'wildcard "*" must be a whole label, as in "*.example.com"'
        elif not label:
            return f"empty label in {_quote(host)}"
        elif not _HOST_LABEL.fullmatch(label):
            return f"invalid character in {_quote(label)}"
    return None


def _target_problem(url: str) -> str | None:
    """Why a target URL is unusable, or None."""
    try:
        parsed = yarl.URL(url)
    except ValueError as exc:
        return f"invalid URL {_quote(url)}: {str(exc).removeprefix('Invalid URL: ')}"
    if parsed.scheme not in ("http", "https"):
        return f"scheme must be http or https, got {_quote(url)}"
    if not parsed.host:
        return f"URL has no host: {_quote(url)}"
    if parsed.user is not None or parsed.password is not None:
        return f"user info in a target URL is not supported: {_quote(url)}"
    # yarl drops an empty "?" or "#"; the string still shows it.
    if "?" in url or "#" in url:
        return f"a target URL must not have a query or fragment: {_quote(url)}"
    return None


def _jwks_url_problem(url: str) -> str | None:
    try:
        parsed = yarl.URL(url)
    except ValueError as exc:
        return f"invalid URL {_quote(url)}: {exc}"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return f"must be an http or https URL, got {_quote(url)}"
    return None


def _dns_name_problem(name: str) -> str | None:
    """Why `name` cannot be looked up in DNS, or None (RFC 1035 section 2.3.4:
    labels of 1-63 octets, 253 in all; `_` allowed, as SRV names need it)."""
    bare = name.removesuffix(".")
    if not bare:
        return "must be a DNS name"
    if not bare.isascii():
        return "must be ASCII; write an internationalised name in its xn-- (IDNA) form"
    if len(bare) > 253:
        return "a DNS name is at most 253 characters"
    for label in bare.split("."):
        if not label:
            return f"empty label in {_quote(name)}"
        if len(label) > 63:
            return f"label {_quote(label[:20] + '...')} is over 63 characters"
        if not _HOST_LABEL.fullmatch(label.lower()):
            return f"invalid character in {_quote(label)}"
    return None


def _nameserver_problem(server: str) -> str | None:
    """Why a `nameservers` item is unusable: "ip", "ip:port" or "[ipv6]:port"."""
    host, port = server, ""
    if server.startswith("["):
        host, sep, port = server[1:].partition("]")
        if not sep or (port and not port.startswith(":")):
            return f"invalid nameserver {_quote(server)}"
        port = port.removeprefix(":")
    elif server.count(":") == 1:
        host, _, port = server.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"must be an IP address, optionally with a port, got {_quote(server)}"
    if port and (not _PORT.fullmatch(port) or not 0 < int(port) <= 65535):
        return f"port must be 1-65535, got {_quote(server)}"
    return None


def _redis_url_problem(url: str) -> str | None:
    """Why `[redis] url` is unusable, or None (redis-py's own URL forms)."""
    try:
        parsed = yarl.URL(url)
    except ValueError as exc:
        return f"invalid URL {_quote(url)}: {str(exc).removeprefix('Invalid URL: ')}"
    if parsed.scheme not in _REDIS_SCHEMES:
        return f"scheme must be redis, rediss or unix, got {_quote(url)}"
    if parsed.scheme == "unix":
        if not parsed.path or parsed.path == "/":
            return f"a unix URL needs the socket path, as in unix:///run/redis.sock: {_quote(url)}"
        return None
    if not parsed.host:
        return f"URL has no host: {_quote(url)}"
    db = parsed.path.strip("/")
    if db and not (db.isascii() and db.isdigit()):
        return f"the path must be a database number, as in redis://host:6379/0: {_quote(url)}"
    return None


class _Loader:
    """One pass over a parsed TOML document, collecting every error."""

    def __init__(self, text: str = "", environ: Mapping[str, str] | None = None) -> None:
        self.errors: list[str] = []
        self.text = text
        self.environ = os.environ if environ is None else environ
        self._lines: dict[tuple[str | int, ...], int] | None = None

    def error(self, path: str, message: str, did_you_mean: Iterable[str] = ()) -> None:
        """Record `path: message`, then ` (line N)` and `; did you mean "x"?` when known."""
        if self._lines is None:  # scanned once, and only for a file with errors
            self._lines = key_lines(self.text)
        line = line_of(self._lines, _path_segments(path))
        where = "" if line is None else f" (line {line})"
        hints = " or ".join(_quote(hint) for hint in did_you_mean)
        hint = f"; did you mean {hints}?" if hints else ""
        self.errors.append(f"{path}: {message}{where}{hint}")

    # -- decoding ------------------------------------------------------------

    def decode(self, raw: object, cls: type[_S], path: str) -> tuple[_S | None, set[str]]:
        """Convert one table; on each error drop the offending key and try again.

        msgspec stops at the first error, so this loop is how every bad key of
        a table gets reported. Returns the Struct (None if the value is not a
        table at all) and the keys that were dropped, so later checks stay
        quiet about them.
        """
        data = dict(raw) if isinstance(raw, dict) else raw
        dropped: set[str] = set()
        while True:
            try:
                return msgspec.convert(data, cls), dropped
            except msgspec.ValidationError as exc:
                text = str(exc)
            where, message = "", text
            if match := _AT.fullmatch(text):
                where, message = match["where"], match["message"]
            key: str | None = None
            if unknown := _UNKNOWN.fullmatch(message):
                key = unknown["key"]
                self.error(
                    f"{path}{where}.{_key(key)}", "unknown key", _close(key, cls.__struct_fields__)
                )
            else:
                self.error(f"{path}{where}", *self._message(message, where, data))
            if first := _FIRST_KEY.match(where):
                key = first["key"]
            if key is None or not isinstance(data, dict) or key not in data:
                return None, dropped
            del data[key]
            dropped.add(key)

    @staticmethod
    def _message(message: str, where: str, data: object) -> tuple[str, list[str]]:
        field = where.removeprefix(".")
        if message.startswith("Invalid enum value") and field in _CHOICES:
            choices = ", ".join(_quote(choice) for choice in _CHOICES[field])
            got = str(data.get(field) if isinstance(data, dict) else None)
            return f"must be one of {choices}, got {_quote(got)}", _close(got, _CHOICES[field])
        return _tidy(message), []

    def table(self, raw: object, path: str) -> dict[str, Any] | None:
        if isinstance(raw, dict):
            return raw
        self.error(path, f"Expected `table`, got `{_type_name(raw)}`")
        return None

    # -- number checks -------------------------------------------------------

    def duration(self, path: str, value: float | UnsetType, *, zero_ok: bool = False) -> None:
        if isinstance(value, UnsetType):
            return
        if not math.isfinite(value):
            self.error(path, "must be a finite number of seconds")
        elif value < 0 or (value == 0 and not zero_ok):
            self.error(path, "must be >= 0" if zero_ok else "must be > 0")

    def count(self, path: str, value: int | UnsetType, *, minimum: int) -> None:
        if not isinstance(value, UnsetType) and value < minimum:
            self.error(
                path, f"must be > {minimum - 1}" if minimum == 1 else f"must be >= {minimum}"
            )

    def tokens(self, path: str, values: list[str], what: str, *, star: bool = False) -> None:
        for position, value in enumerate(values):
            if not (_TOKEN.fullmatch(value) or (star and value == "*")):
                self.error(f"{path}[{position}]", f"{_quote(value)} is not a valid {what}")

    def methods(self, path: str, values: list[str], *, star: bool = False) -> None:
        """HTTP methods: RFC 9110 tokens; one edit away from a standard method is a typo.

        RFC 9110 section 9.1 lets anyone define a method, so an unknown token
        (PURGE, a WebDAV or in-house method) is accepted as written. But GTE or
        DELTE is almost surely GET or DELETE misspelt, and accepting it would make
        the route answer 405 to the method that was meant: refused, with the guess.
        Registered methods (IANA) are never taken for typos.
        """
        self.tokens(path, values, "HTTP method", star=star)
        for position, value in enumerate(values):
            method = value.upper()
            if not _TOKEN.fullmatch(value) or method in _REGISTERED_METHODS:
                continue
            meant = [known for known in _STANDARD_METHODS if _one_edit_apart(method, known)]
            if meant:
                self.error(f"{path}[{position}]", f"unknown method {_quote(value)}", meant)

    # -- [server] ------------------------------------------------------------

    def server(self, raw: object) -> ServerConfig | None:
        server, _ = self.decode(raw, _RawServer, "server")
        if server is None:
            return None
        seen: dict[tuple[str, int] | str, int] = {}
        listen: list[str] = list(_SERVER.listen)
        tls_listen: list[int] = []
        if not isinstance(server.listen, UnsetType):
            if not server.listen:
                self.error("server.listen", "must name at least one address")
            listen = []
            for position, item in enumerate(server.listen):
                here = f"server.listen[{position}]"
                entry = self.listen_entry(item, here)
                if entry is None:
                    continue
                addr, tls = entry
                listen.append(addr)
                if tls:
                    tls_listen.append(len(listen) - 1)
                    if addr.startswith("unix:"):
                        self.error(f"{here}.tls", "TLS is for TCP listeners only")
                if isinstance(item, dict):
                    here = f"{here}.address"
                try:
                    parsed = parse_listen_address(addr)
                except ValueError as exc:
                    self.error(here, str(exc))
                    continue
                if parsed in seen:
                    self.error(here, f"duplicate address {_quote(addr)}")
                elif not (isinstance(parsed, tuple) and parsed[1] == 0):
                    seen[parsed] = position
        if not isinstance(server.admin, UnsetType) and server.admin:
            try:
                admin = parse_listen_address(server.admin)
            except ValueError as exc:
                self.error("server.admin", str(exc))
            else:
                if isinstance(admin, str):
                    self.error("server.admin", 'must be "host:port" ("" turns it off)')
                elif admin in seen:
                    self.error("server.admin", f"same address as server.listen[{seen[admin]}]")
        self.duration("server.drain_timeout", server.drain_timeout, zero_ok=True)
        self.duration("server.client_timeout", server.client_timeout)
        self.count("server.workers", server.workers, minimum=0)
        if not isinstance(server.workers, UnsetType) and server.workers > MAX_WORKERS:
            self.error("server.workers", f"must be <= {MAX_WORKERS} (0 = one per CPU)")
        if not isinstance(server.trusted_proxies, UnsetType):
            for position, cidr in enumerate(server.trusted_proxies):
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError as exc:
                    self.error(f"server.trusted_proxies[{position}]", str(exc))
        certificates: tuple[CertificateConfig, ...] = ()
        if not isinstance(server.certificates, UnsetType):
            certificates = self.certificates(server.certificates)
        server_tls = _SERVER.tls
        if not isinstance(server.tls, UnsetType):
            raw_tls, _ = self.decode(server.tls, _RawServerTLS, "server.tls")
            if raw_tls is not None:
                server_tls = ServerTLSConfig(
                    min_version=_or(raw_tls.min_version, server_tls.min_version)
                )
        if tls_listen and isinstance(server.certificates, UnsetType):
            self.error(
                "server.certificates",
                "required: a TLS listener needs at least one [[server.certificates]]",
            )
        token_env = server.admin_token_env
        if isinstance(token_env, str) and token_env and not _ENV_NAME.fullmatch(token_env):
            self.error(
                "server.admin_token_env",
                f"{_quote(token_env)} is not an environment variable name",
            )
        if not isinstance(server.admin_cors_origins, UnsetType):
            for position, origin in enumerate(server.admin_cors_origins):
                if not _ORIGIN.fullmatch(origin):
                    self.error(
                        f"server.admin_cors_origins[{position}]",
                        f'{_quote(origin)} is not an origin like "https://ops.example.com"',
                    )
        return ServerConfig(
            admin_token_env=_or(server.admin_token_env, _SERVER.admin_token_env),
            admin_cors_origins=tuple(
                _or(server.admin_cors_origins, list(_SERVER.admin_cors_origins))
            ),
            listen=tuple(listen),
            tls_listen=tuple(tls_listen),
            certificates=certificates,
            tls=server_tls,
            admin=_or(server.admin, _SERVER.admin),
            drain_timeout=_or(server.drain_timeout, _SERVER.drain_timeout),
            trusted_proxies=tuple(_or(server.trusted_proxies, list(_SERVER.trusted_proxies))),
            access_log=_or(server.access_log, _SERVER.access_log),
            client_timeout=_or(server.client_timeout, _SERVER.client_timeout),
            workers=_or(server.workers, _SERVER.workers),
        )

    def listen_entry(self, item: object, path: str) -> tuple[str, bool] | None:
        """One `listen` item: "host:port", or { address = "host:port", tls = true }."""
        if isinstance(item, str):
            return item, False
        if not isinstance(item, dict):
            self.error(path, f"Expected `str` or `table`, got `{_type_name(item)}`")
            return None
        raw, dropped = self.decode(item, _RawListen, path)
        if raw is None:
            return None
        if isinstance(raw.address, UnsetType):
            if "address" not in dropped:
                self.error(f"{path}.address", "required")
            return None
        return raw.address, _or(raw.tls, False)

    def certificates(self, raw: list[Any]) -> tuple[CertificateConfig, ...]:
        """[[server.certificates]]: each pair must exist, parse and match; the
        first serves clients that send no SNI (or a name no certificate has)."""
        if not raw:
            self.error("server.certificates", "must not be empty (leave it out instead)")
        out: list[CertificateConfig] = []
        for position, item in enumerate(raw):
            path = f"server.certificates[{position}]"
            cert, dropped = self.decode(item, _RawCertificate, path)
            if cert is None:
                continue
            for key in ("cert", "key"):
                if isinstance(getattr(cert, key), UnsetType) and key not in dropped:
                    self.error(f"{path}.{key}", "required")
            if isinstance(cert.cert, UnsetType) or isinstance(cert.key, UnsetType):
                continue
            problem = check_pair(cert.cert, cert.key)
            if problem is not None:
                self.error(path, problem)
                continue
            hosts: list[str] = []
            if isinstance(cert.hosts, UnsetType):
                hosts = certificate_names(cert.cert)
            else:
                for index, host in enumerate(cert.hosts):
                    lowered = host.lower()
                    if problem := _host_problem(lowered):
                        self.error(f"{path}.hosts[{index}]", problem)
                    hosts.append(lowered)
            out.append(CertificateConfig(cert=cert.cert, key=cert.key, hosts=tuple(hosts)))
        return tuple(out)

    def upstream_tls(self, raw: object, path: str) -> UpstreamTLSConfig | None:
        tls, _ = self.decode(raw, _RawUpstreamTLS, path)
        if tls is None:
            return None
        cert, key = _or(tls.cert, None), _or(tls.key, None)
        if (cert is None) != (key is None):
            self.error(
                f"{path}.{'key' if key is None else 'cert'}",
                "required with " + ("cert" if key is None else "key") + " (mutual TLS)",
            )
        elif cert is not None and key is not None:
            problem = check_pair(cert, key)
            if problem is not None:
                self.error(path, problem)
        ca_file = _or(tls.ca_file, None)
        if ca_file is not None:
            problem = check_ca_file(ca_file)
            if problem is not None:
                self.error(f"{path}.ca_file", problem)
        server_name = _or(tls.server_name, None)
        if server_name is not None and (problem := _host_problem(server_name.lower())):
            self.error(f"{path}.server_name", problem)
        elif server_name is not None and "*" in server_name:
            self.error(f"{path}.server_name", "must be one name, not a wildcard")
        return UpstreamTLSConfig(
            verify=_or(tls.verify, True),
            ca_file=ca_file,
            server_name=server_name,
            cert=cert,
            key=key,
        )

    # -- [defaults] and the same keys on a route -----------------------------

    def overridable(self, path: str, raw: _RawDefaults) -> None:
        self.duration(f"{path}.connect_timeout", raw.connect_timeout)
        self.duration(f"{path}.read_timeout", raw.read_timeout)
        self.count(f"{path}.max_body_bytes", raw.max_body_bytes, minimum=0)
        self.count(f"{path}.retries", raw.retries, minimum=0)
        self.duration(f"{path}.tunnel_idle_timeout", raw.tunnel_idle_timeout)

    def defaults(self, raw: object) -> _RawDefaults:
        defaults, _ = self.decode(raw, _RawDefaults, "defaults")
        if defaults is None:
            return _RawDefaults()
        self.overridable("defaults", defaults)
        return defaults

    # -- [upstreams.NAME] ----------------------------------------------------

    def upstream(self, name: str, raw: object) -> UpstreamConfig | None:
        path = f"upstreams.{_key(name)}"
        if not name:
            self.error(path, "upstream name must not be empty")
        upstream, dropped = self.decode(raw, _RawUpstream, path)
        if upstream is None:
            return None
        targets: list[TargetConfig] = []
        discover: list[DiscoveryConfig] = []
        weighted: list[str] = []  # key paths of weights above 1
        if isinstance(upstream.targets, UnsetType):
            if "targets" not in dropped:
                self.error(f"{path}.targets", "required")
        elif not upstream.targets:
            self.error(f"{path}.targets", "must not be empty")
        else:
            first_at: dict[str, int] = {}
            for position, item in enumerate(upstream.targets):
                here = f"{path}.targets[{position}]"
                if isinstance(item, dict) and ("dns" in item or "srv" in item):
                    found = self.discovery(item, here)
                    if found is not None:
                        if found.written in first_at:
                            self.error(
                                here,
                                f"duplicate target {_quote(found.written)} "
                                f"(also targets[{first_at[found.written]}])",
                            )
                        first_at[found.written] = position
                        discover.append(found)
                        if found.weight > 1:
                            weighted.append(f"{here}.weight")
                    continue
                target = self.target(item, here)
                if target is None:
                    continue
                if target.url in first_at:
                    self.error(
                        f"{here}.url" if isinstance(item, dict) else here,
                        f"duplicate target {_quote(target.url)} "
                        f"(also targets[{first_at[target.url]}])",
                    )
                else:
                    first_at[target.url] = position
                targets.append(target)
                if target.weight > 1 and isinstance(item, dict):  # < 1 is refused anyway
                    weighted.append(f"{here}.weight")
        # round_robin takes each target in turn and never reads a weight (the others all
        # do): a weight there would be a silent no-op, so it is refused. weight = 1 is
        # the default and means the same under every balancer.
        if weighted and "balancer" not in dropped and upstream.balancer in (UNSET, "round_robin"):
            chosen = (
                "the default balancer" if isinstance(upstream.balancer, UnsetType) else "balancer"
            )
            for where in weighted:
                self.error(
                    where,
                    f'weight has no effect with {chosen} "round_robin"; '
                    'use balancer = "weighted" (or "least_connections" / "ip_hash")',
                )
        health: HealthConfig | None = None
        if not isinstance(upstream.health, UnsetType):
            health = self.health(upstream.health, f"{path}.health")
        breaker = _BREAKER
        if not isinstance(upstream.breaker, UnsetType):
            breaker = self.breaker(upstream.breaker, f"{path}.breaker") or _BREAKER
        panic = upstream.panic_threshold
        if not isinstance(panic, UnsetType) and not 0.0 <= panic <= 1.0:  # NaN fails too
            self.error(f"{path}.panic_threshold", "must be a share between 0 and 1")
            panic = UNSET
        tls: UpstreamTLSConfig | None = None
        if not isinstance(upstream.tls, UnsetType):
            tls = self.upstream_tls(upstream.tls, f"{path}.tls")
        self.duration(f"{path}.dns_refresh", upstream.dns_refresh)
        if not isinstance(upstream.dns_refresh, UnsetType) and upstream.dns_refresh < 0.1:
            # A lookup storm against the resolver is never what was meant.
            self.error(f"{path}.dns_refresh", "must be >= 0.1 seconds")
        nameservers = _or(upstream.nameservers, [])
        for position, server in enumerate(nameservers):
            if problem := _nameserver_problem(server):
                self.error(f"{path}.nameservers[{position}]", problem)
        if not discover:
            for key in ("dns_refresh", "nameservers"):
                if getattr(upstream, key) is not UNSET:
                    self.error(f"{path}.{key}", 'has no effect without a "dns" or "srv" target')
        return UpstreamConfig(
            name=name,
            balancer=_or(upstream.balancer, "round_robin"),
            targets=tuple(targets),
            health=health,
            breaker=breaker,
            panic_threshold=_or(panic, _PANIC_THRESHOLD),
            tls=tls,
            discover=tuple(discover),
            dns_refresh=_or(upstream.dns_refresh, _UPSTREAM.dns_refresh),
            nameservers=tuple(nameservers),
        )

    def discovery(self, item: dict[str, Any], path: str) -> DiscoveryConfig | None:
        """A `{ dns = "host:port" }` or `{ srv = "_http._tcp.name" }` target."""
        raw, _ = self.decode(item, _RawTarget, path)
        if raw is None:
            return None
        given = [k for k in ("url", "dns", "srv") if getattr(raw, k) is not UNSET]
        if len(given) > 1:
            self.error(path, f"set only one of url, dns and srv, got {' and '.join(given)}")
            return None
        self.count(f"{path}.weight", raw.weight, minimum=1)
        weight = _or(raw.weight, 1)
        if not isinstance(raw.dns, UnsetType):
            here = f"{path}.dns"
            written = raw.dns
            host, sep, port = written.rpartition(":")
            if not sep or not _PORT.fullmatch(port) or not 0 < int(port) <= 65535:
                self.error(here, f'must be "host:port" with a port 1-65535, got {_quote(written)}')
                return None
            if problem := _dns_name_problem(host):
                self.error(here, problem)
                return None
            name = host.lower().removesuffix(".")
            return DiscoveryConfig(
                kind="dns", name=name, port=int(port), weight=weight, written=written
            )
        assert not isinstance(raw.srv, UnsetType)
        here = f"{path}.srv"
        written = raw.srv
        if problem := _dns_name_problem(written):
            self.error(here, problem)
            return None
        if not isinstance(raw.weight, UnsetType):
            self.error(f"{path}.weight", "an srv target takes its weights from the SRV records")
        return DiscoveryConfig(kind="srv", name=written.lower().removesuffix("."), written=written)

    def target(self, item: object, path: str) -> TargetConfig | None:
        if isinstance(item, str):
            url, weight, url_path = item, 1, path
        elif isinstance(item, dict):
            raw, dropped = self.decode(item, _RawTarget, path)
            if raw is None:
                return None
            if isinstance(raw.url, UnsetType):
                if "url" not in dropped:
                    self.error(f"{path}.url", "required")
                return None
            url, url_path = raw.url, f"{path}.url"
            weight = _or(raw.weight, 1)
            self.count(f"{path}.weight", raw.weight, minimum=1)
        else:
            self.error(path, f"Expected `str` or `table`, got `{_type_name(item)}`")
            return None
        if problem := _target_problem(url):
            self.error(url_path, problem)
        return TargetConfig(url=url, weight=weight)

    def health(self, raw: object, path: str) -> HealthConfig | None:
        health, _ = self.decode(raw, _RawHealth, path)
        if health is None:
            return None
        if not isinstance(health.path, UnsetType) and not health.path.startswith("/"):
            self.error(f"{path}.path", 'must start with "/"')
        self.duration(f"{path}.interval", health.interval)
        self.duration(f"{path}.timeout", health.timeout)
        self.count(f"{path}.healthy_threshold", health.healthy_threshold, minimum=1)
        self.count(f"{path}.unhealthy_threshold", health.unhealthy_threshold, minimum=1)
        return HealthConfig(
            path=_or(health.path, _HEALTH.path),
            interval=_or(health.interval, _HEALTH.interval),
            timeout=_or(health.timeout, _HEALTH.timeout),
            healthy_threshold=_or(health.healthy_threshold, _HEALTH.healthy_threshold),
            unhealthy_threshold=_or(health.unhealthy_threshold, _HEALTH.unhealthy_threshold),
        )

    def breaker(self, raw: object, path: str) -> BreakerConfig | None:
        breaker, _ = self.decode(raw, _RawBreaker, path)
        if breaker is None:
            return None
        self.count(f"{path}.failures", breaker.failures, minimum=1)
        self.duration(f"{path}.cooldown", breaker.cooldown)
        self.duration(f"{path}.max_cooldown", breaker.max_cooldown)
        cooldown = _or(breaker.cooldown, _BREAKER.cooldown)
        if isinstance(breaker.max_cooldown, UnsetType):
            # A long cooldown alone is not an error: it just does not double.
            max_cooldown = max(cooldown, _BREAKER.max_cooldown)
        else:
            max_cooldown = breaker.max_cooldown
            if max_cooldown < cooldown:
                self.error(f"{path}.max_cooldown", f"must be >= cooldown ({_seconds(cooldown)})")
        if not (math.isfinite(cooldown) and cooldown > 0):
            cooldown = _BREAKER.cooldown
        if not (math.isfinite(max_cooldown) and max_cooldown >= cooldown):
            max_cooldown = max(cooldown, _BREAKER.max_cooldown)
        return BreakerConfig(
            failures=_or(breaker.failures, _BREAKER.failures),
            cooldown=cooldown,
            max_cooldown=max_cooldown,
        )

    # -- [[routes]] ----------------------------------------------------------

    def route(
        self,
        index: int,
        raw: object,
        defaults: _RawDefaults,
        upstream_names: set[str],
        names: dict[str, int],
        auth_names: Iterable[str] = (),
        has_cache: bool = False,
    ) -> RouteConfig | None:
        path = f"routes[{index}]"
        if isinstance(raw, dict) and isinstance(raw.get("name"), str) and raw["name"]:
            path = f"{path} ({_quote(raw['name'])})"
        route, dropped = self.decode(raw, _RawRoute, path)
        if route is None:
            return None

        name = ""
        if isinstance(route.name, UnsetType):
            if "name" not in dropped:
                self.error(f"{path}.name", "required")
        elif not route.name:
            self.error(f"{path}.name", "must not be empty")
        else:
            name = route.name
            if not name.isascii() or not name.isprintable() or '"' in name or "\\" in name:
                # it travels in RateLimit headers as an RFC 8941 sf-string
                self.error(f"{path}.name", "must be printable ASCII without '\"' or '\\'")
            if name in names:
                self.error(
                    f"{path}.name",
                    f"duplicate route name {_quote(name)} (also routes[{names[name]}])",
                )
            else:
                names[name] = index

        upstream = ""
        redirect: Template | None = None
        if not isinstance(route.redirect, UnsetType):
            if not isinstance(route.upstream, UnsetType):
                self.error(f"{path}.redirect", "cannot be set together with upstream")
            redirect = self.template(f"{path}.redirect", route.redirect, redirect=True)
        if not isinstance(route.redirect_status, UnsetType):
            if route.redirect_status not in _REDIRECT_STATUSES:
                self.error(
                    f"{path}.redirect_status",
                    f"must be one of {', '.join(map(str, _REDIRECT_STATUSES))}",
                )
            elif isinstance(route.redirect, UnsetType):
                self.error(f"{path}.redirect_status", "needs redirect")
        if not isinstance(route.redirect, UnsetType):
            pass
        elif isinstance(route.upstream, UnsetType):
            if "upstream" not in dropped:
                self.error(f"{path}.upstream", "required")
        elif route.upstream not in upstream_names:
            self.error(
                f"{path}.upstream",
                f"unknown upstream {_quote(route.upstream)}",
                _close(route.upstream, upstream_names),
            )
        else:
            upstream = route.upstream

        has_path = not isinstance(route.path, UnsetType)
        has_regex = not isinstance(route.path_regex, UnsetType)
        if has_path and has_regex:
            self.error(f"{path}.path_regex", "cannot be set together with path")
        elif not has_path and not has_regex and not dropped & {"path", "path_regex"}:
            self.error(f"{path}.path", "required (or path_regex)")
        if not isinstance(route.path, UnsetType):
            if not route.path.startswith("/"):
                self.error(f"{path}.path", 'must start with "/"')
            elif "?" in route.path or "#" in route.path:
                self.error(f"{path}.path", "must not contain a query or fragment")
            elif _CONTROL.search(route.path) or " " in route.path:
                self.error(f"{path}.path", "must not contain spaces or control characters")
        if not isinstance(route.path_regex, UnsetType):
            try:
                re.compile(route.path_regex)
            except re.error as exc:
                self.error(f"{path}.path_regex", f"invalid regex: {exc}")
            else:
                # Only for a route that is plainly a regex route: beside a broken regex,
                # or a path that is also set, this would be a second report of one mistake.
                if route.strip_prefix is True and not has_path:
                    self.error(
                        f"{path}.strip_prefix", "needs path (a regex has no prefix to strip)"
                    )

        host: str | None = None
        if not isinstance(route.host, UnsetType):
            host = route.host.lower()
            if problem := _host_problem(host):
                self.error(f"{path}.host", problem)

        methods: tuple[str, ...] | None = None
        if not isinstance(route.methods, UnsetType):
            if not route.methods:
                self.error(
                    f"{path}.methods", "must not be empty (leave it out to allow every method)"
                )
            self.methods(f"{path}.methods", route.methods)
            methods = tuple(dict.fromkeys(method.upper() for method in route.methods))

        headers: dict[str, str] = {}
        if not isinstance(route.headers, UnsetType):
            for header, value in route.headers.items():
                here = f"{path}.headers.{_key(header)}"
                if not _TOKEN.fullmatch(header):
                    self.error(here, f"{_quote(header)} is not a valid header name")
                elif header.lower() in headers:
                    self.error(here, "duplicate header name (names are case-insensitive)")
                if not isinstance(value, str):
                    self.error(here, f"Expected `str`, got `{_type_name(value)}`")
                elif _CONTROL.search(value):
                    self.error(here, "must not contain control characters")
                else:
                    headers.setdefault(header.lower(), value)

        self.overridable(path, route)
        rate_limit: RateLimitConfig | None = None
        if not isinstance(route.rate_limit, UnsetType):
            rate_limit = self.rate_limit(route.rate_limit, f"{path}.rate_limit")
        cors: CorsConfig | None = None
        if not isinstance(route.cors, UnsetType):
            cors = self.cors(route.cors, f"{path}.cors")
        cache: RouteCacheConfig | None = None
        if not isinstance(route.cache, UnsetType):
            cache = self.route_cache(route.cache, f"{path}.cache", has_cache)

        auth: tuple[str, ...] = ()
        if not isinstance(route.auth, UnsetType):
            wanted = [route.auth] if isinstance(route.auth, str) else route.auth
            known = list(auth_names)
            if not wanted:
                self.error(f"{path}.auth", "must name at least one policy (leave it out for none)")
            for position, policy in enumerate(wanted):
                here = f"{path}.auth" if isinstance(route.auth, str) else f"{path}.auth[{position}]"
                if policy not in known:
                    self.error(here, f"unknown auth policy {_quote(policy)}", _close(policy, known))
            auth = tuple(dict.fromkeys(wanted))
        if route.strip_credentials is True and not auth:
            self.error(f"{path}.strip_credentials", "needs auth")
        if rate_limit is not None and rate_limit.key == "consumer" and not auth:
            self.error(f"{path}.rate_limit.key", '"consumer" needs auth on the route')
        access: AccessConfig | None = None
        if not isinstance(route.access, UnsetType):
            access = self.access(route.access, f"{path}.access", bool(auth))
        request_headers: HeaderTransform | None = None
        if not isinstance(route.request_headers, UnsetType):
            request_headers = self.transform(route.request_headers, f"{path}.request_headers")
        response_headers: HeaderTransform | None = None
        if not isinstance(route.response_headers, UnsetType):
            response_headers = self.transform(route.response_headers, f"{path}.response_headers")
        rewrite: RewriteConfig | None = None
        if not isinstance(route.rewrite, UnsetType):
            rewrite = self.rewrite(route.rewrite, f"{path}.rewrite")
            if rewrite is not None and redirect is not None:
                self.error(f"{path}.rewrite", "has no effect on a redirect route")

        return RouteConfig(
            index=index,
            name=name,
            upstream=upstream,
            path=_or(route.path, None),
            path_regex=_or(route.path_regex, None),
            host=host,
            methods=methods,
            headers=tuple(headers.items()),
            strip_prefix=_or(route.strip_prefix, _ROUTE.strip_prefix),
            preserve_host=_or(route.preserve_host, _ROUTE.preserve_host),
            priority=_or(route.priority, _ROUTE.priority),
            connect_timeout=_or(
                route.connect_timeout, _or(defaults.connect_timeout, _ROUTE.connect_timeout)
            ),
            read_timeout=_or(route.read_timeout, _or(defaults.read_timeout, _ROUTE.read_timeout)),
            max_body_bytes=_or(
                route.max_body_bytes, _or(defaults.max_body_bytes, _ROUTE.max_body_bytes)
            ),
            retries=_or(route.retries, _or(defaults.retries, _ROUTE.retries)),
            tunnel_idle_timeout=_or(
                route.tunnel_idle_timeout,
                _or(defaults.tunnel_idle_timeout, _ROUTE.tunnel_idle_timeout),
            ),
            websocket=_or(route.websocket, _ROUTE.websocket),
            rate_limit=rate_limit,
            cors=cors,
            cache=cache,
            auth=auth,
            strip_credentials=_or(route.strip_credentials, False),
            access=access,
            request_headers=request_headers,
            response_headers=response_headers,
            rewrite=rewrite,
            redirect=redirect,
            redirect_status=_or(route.redirect_status, 308),
        )

    # -- identity, access and transforms --------------------------------------

    def template(self, path: str, text: str, *, redirect: bool = False) -> Template | None:
        try:
            template = parse_template(text, ("path",) if redirect else ())
        except ValueError as exc:
            known = ["path"] if redirect else []
            name = str(exc).partition("{")[2].rstrip("}")
            self.error(
                path,
                str(exc),
                [f"{{{m}}}" for m in _close(name, [*known, *_PLACEHOLDER_NAMES])],
            )
            return None
        if _CONTROL.search(text):
            self.error(path, "must not contain control characters")
            return None
        return template

    def access(self, raw: object, path: str, has_auth: bool) -> AccessConfig | None:
        access, _ = self.decode(raw, _RawAccess, path)
        if access is None:
            return None
        scopes = _or(access.scopes, [])
        for position, scope in enumerate(scopes):
            if not scope or " " in scope or _CONTROL.search(scope):
                self.error(f"{path}.scopes[{position}]", "a scope is one word")
        claims: list[tuple[str, tuple[str | int | bool, ...]]] = []
        for name, value in _or(access.claims, {}).items():
            here = f"{path}.claims.{_key(name)}"
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, str | int | bool) for v in values):
                self.error(here, "must be a string, number or boolean, or an array of them")
                continue
            claims.append((name, tuple(values)))
        if (scopes or claims) and not has_auth:
            self.error(f"{path}.scopes" if scopes else f"{path}.claims", "needs auth on the route")
        allow = _or(access.allow_ips, [])
        deny = _or(access.deny_ips, [])
        for key, cidrs in (("allow_ips", allow), ("deny_ips", deny)):
            for position, cidr in enumerate(cidrs):
                try:
                    parse_cidr(cidr)
                except ValueError:
                    self.error(f"{path}.{key}[{position}]", f"invalid CIDR {_quote(cidr)}")
        return AccessConfig(
            scopes=tuple(scopes),
            claims=tuple(claims),
            allow_ips=tuple(allow),
            deny_ips=tuple(deny),
        )

    def transform(self, raw: object, path: str) -> HeaderTransform | None:
        transform, _ = self.decode(raw, _RawHeaderTransform, path)
        if transform is None:
            return None
        parts: dict[str, list[tuple[str, Template]]] = {"set": [], "add": []}
        for kind in ("set", "add"):
            values: dict[str, str] = _or(getattr(transform, kind), {})
            for name, text in values.items():
                here = f"{path}.{kind}.{_key(name)}"
                if not self.header_name(here, name):
                    continue
                template = self.template(here, text)
                if template is not None:
                    parts[kind].append((name, template))
        remove = _or(transform.remove, [])
        for position, name in enumerate(remove):
            self.header_name(f"{path}.remove[{position}]", name)
        return HeaderTransform(
            set=tuple(parts["set"]), add=tuple(parts["add"]), remove=tuple(remove)
        )

    def header_name(self, path: str, name: str) -> bool:
        if not _TOKEN.fullmatch(name):
            self.error(path, f"{_quote(name)} is not a valid header name")
            return False
        if name.lower() in _UNTOUCHABLE:
            self.error(path, f"{name} belongs to the connection and cannot be changed")
            return False
        return True

    def rewrite(self, raw: object, path: str) -> RewriteConfig | None:
        rewrite, dropped = self.decode(raw, _RawRewrite, path)
        if rewrite is None:
            return None
        ok = True
        for key in ("pattern", "replace"):
            if isinstance(getattr(rewrite, key), UnsetType):
                ok = False
                if key not in dropped:
                    self.error(f"{path}.{key}", "required")
        if not ok:
            return None
        pattern, replace = str(rewrite.pattern), str(rewrite.replace)
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            self.error(f"{path}.pattern", f"invalid regex: {exc}")
            return None
        for ref in _GROUP_REF.finditer(replace):
            number, named = ref["number"], ref["name"]
            if number is not None and int(number) > compiled.groups:
                self.error(f"{path}.replace", f"no group {number} in the pattern")
                return None
            if named is not None and not (
                named in compiled.groupindex or (named.isdigit() and int(named) <= compiled.groups)
            ):
                self.error(f"{path}.replace", f"no group {_quote(named)} in the pattern")
                return None
        if _CONTROL.search(replace) or " " in replace:
            self.error(f"{path}.replace", "must not contain spaces or control characters")
            return None
        return RewriteConfig(pattern=pattern, replace=replace)

    def policy(self, name: str, raw: object, base: str) -> AuthPolicy | None:
        path = f"auth.{_key(name)}"
        policy, dropped = self.decode(raw, _RawAuth, path)
        if policy is None:
            return None
        if isinstance(policy.type, UnsetType):
            if "type" not in dropped:
                self.error(f"{path}.type", 'required ("jwt" or "api_key")')
            return None
        wrong = _API_KEY_ONLY if policy.type == "jwt" else _JWT_ONLY
        for key in wrong:
            if not isinstance(getattr(policy, key), UnsetType):
                self.error(f"{path}.{key}", f"not a key of a {policy.type} policy")
        if policy.type == "api_key":
            return self.api_key_policy(name, policy, path, base)
        return self.jwt_policy(name, policy, path, base)

    def read(self, path: str, file: str, base: str) -> str | None:
        full = os.path.join(base, file)
        try:
            with open(full, "rb") as handle:
                data = handle.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            self.error(path, f"cannot read {_quote(full)}: {exc.strerror or exc}")
            return None
        if len(data) > MAX_KEY_FILE_BYTES:
            self.error(path, f"{_quote(full)} is over {MAX_KEY_FILE_BYTES} bytes")
            return None
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            self.error(path, f"{_quote(full)} is not UTF-8 (byte {exc.start})")
            return None

    def forwarded_header(self, path: str, name: str) -> None:
        if self.header_name(path, name) and "_" in name:
            # Dropped from requests as nginx does (CONTRACT.md "Headers").
            self.error(path, "a header name with '_' would be dropped on the way")

    def api_key_policy(
        self, name: str, policy: _RawAuth, path: str, base: str
    ) -> ApiKeyPolicy | None:
        header = _or(policy.header, "X-Api-Key")
        self.header_name(f"{path}.header", header)
        forward = _or(policy.forward_consumer, None)
        if forward is not None:
            self.forwarded_header(f"{path}.forward_consumer", forward)
        if isinstance(policy.keys_file, UnsetType):
            self.error(f"{path}.keys_file", "required")
            return None
        text = self.read(f"{path}.keys_file", policy.keys_file, base)
        if text is None:
            return None
        consumers, errors = parse_keys_file(text)
        for problem in errors:
            self.error(f"{path}.keys_file", f"{policy.keys_file}: {problem}")
        return ApiKeyPolicy(
            name=name,
            header=header,
            keys_file=policy.keys_file,
            consumers=tuple(consumers),
            forward_consumer=forward,
        )

    def jwt_policy(self, name: str, policy: _RawAuth, path: str, base: str) -> JwtPolicy | None:
        algorithms = _or(policy.algorithms, [])
        if isinstance(policy.algorithms, UnsetType):
            self.error(f"{path}.algorithms", "required")
        elif not algorithms:
            self.error(f"{path}.algorithms", "must name at least one algorithm")
        for position, alg in enumerate(algorithms):
            if alg not in JWT_ALGORITHMS:
                why = '"none" is never accepted' if alg.lower() == "none" else "unknown algorithm"
                self.error(
                    f"{path}.algorithms[{position}]",
                    f"{why}: {_quote(alg)}",
                    _close(alg, JWT_ALGORITHMS),
                )
        hmac_wanted = any(alg in HMAC_ALGORITHMS for alg in algorithms)
        public_wanted = any(alg not in HMAC_ALGORITHMS for alg in algorithms)
        secret: str | None = None
        secret_env = _or(policy.secret_env, None)
        if secret_env is not None:
            if not hmac_wanted:
                self.error(f"{path}.secret_env", "only HS256/384/512 use a secret")
            secret = self.environ.get(secret_env)
            if not secret:
                self.error(f"{path}.secret_env", f"environment variable {secret_env} is not set")
            elif len(secret.encode()) < 32:
                # RFC 7518 3.2: a key of at least the hash's size (HS256: 32 bytes).
                self.error(f"{path}.secret_env", f"{secret_env} must hold at least 32 bytes")
        elif hmac_wanted:
            self.error(
                f"{path}.algorithms",
                "HS256/384/512 need secret_env (an HS key is never read from a JWKS)",
            )
        jwks_file = _or(policy.jwks_file, None)
        jwks_url = _or(policy.jwks_url, None)
        jwks: str | None = None
        if jwks_file is not None and jwks_url is not None:
            self.error(f"{path}.jwks_url", "cannot be set together with jwks_file")
        elif public_wanted and jwks_file is None and jwks_url is None:
            self.error(
                f"{path}.jwks_file",
                "required (or jwks_url) for "
                + ", ".join(alg for alg in algorithms if alg not in HMAC_ALGORITHMS),
            )
        if jwks_file is not None:
            jwks = self.read(f"{path}.jwks_file", jwks_file, base)
            if jwks is not None:
                try:
                    if not parse_jwks(jwks):
                        self.error(f"{path}.jwks_file", f"{jwks_file}: no usable signature key")
                except ValueError as exc:
                    self.error(f"{path}.jwks_file", f"{jwks_file}: {exc}")
        if jwks_url is not None and (problem := _jwks_url_problem(jwks_url)):
            self.error(f"{path}.jwks_url", problem)
        self.duration(f"{path}.jwks_refresh", policy.jwks_refresh)
        self.duration(f"{path}.leeway", policy.leeway, zero_ok=True)
        forward: list[tuple[str, str]] = []
        for claim, header in _or(policy.forward_claims, {}).items():
            self.forwarded_header(f"{path}.forward_claims.{_key(claim)}", header)
            forward.append((claim, header))
        audiences = _or(policy.audiences, [])
        return JwtPolicy(
            name=name,
            algorithms=tuple(algorithms),
            jwks_file=jwks_file,
            jwks=jwks,
            jwks_url=jwks_url,
            jwks_refresh=_or(policy.jwks_refresh, 300.0),
            secret_env=secret_env,
            secret=secret,
            issuer=_or(policy.issuer, None),
            audiences=tuple(audiences),
            leeway=_or(policy.leeway, 30.0),
            forward_claims=tuple(forward),
        )

    def rate_limit(self, raw: object, path: str) -> RateLimitConfig | None:
        limit, dropped = self.decode(raw, _RawRateLimit, path)
        if limit is None:
            return None
        if isinstance(limit.rate, UnsetType):
            if "rate" not in dropped:
                self.error(f"{path}.rate", "required")
        elif not math.isfinite(limit.rate) or limit.rate <= 0:
            self.error(f"{path}.rate", "must be a finite number > 0")
        if isinstance(limit.burst, UnsetType):
            if "burst" not in dropped:
                self.error(f"{path}.burst", "required")
        else:
            self.count(f"{path}.burst", limit.burst, minimum=1)
        key = _or(limit.key, "client_ip")
        header = key.removeprefix("header:")
        if key not in _RATE_LIMIT_KEYS and not (
            key.startswith("header:") and _TOKEN.fullmatch(header)
        ):
            kind, colon, name = key.partition(":")
            meant = _close(key, _RATE_LIMIT_KEYS)
            if colon and name and _TOKEN.fullmatch(name) and _close(kind, ("header",)):
                meant = [f"header:{name}"]  # "headers:X-Api-Key", "Header:X-Api-Key"
            self.error(
                f"{path}.key",
                f'must be "client_ip", "route", "consumer" or "header:NAME", got {_quote(key)}',
                meant,
            )
        return RateLimitConfig(
            rate=_or(limit.rate, 1.0),
            burst=_or(limit.burst, 1),
            key=key,
            store=_or(limit.store, "local"),
        )

    def redis(self, raw: object) -> RedisConfig | None:
        redis, _ = self.decode(raw, _RawRedis, "redis")
        if redis is None:
            return None
        self.duration("redis.timeout", redis.timeout)
        if not isinstance(redis.url, UnsetType) and (problem := _redis_url_problem(redis.url)):
            self.error("redis.url", problem)
        return RedisConfig(
            url=_or(redis.url, _REDIS.url), timeout=_or(redis.timeout, _REDIS.timeout)
        )

    def cors(self, raw: object, path: str) -> CorsConfig | None:
        cors, _ = self.decode(raw, _RawCors, path)
        if cors is None:
            return None
        origins = _or(cors.allow_origins, list(_CORS.allow_origins))
        if not origins:
            self.error(f"{path}.allow_origins", 'must not be empty (["*"] allows every origin)')
        for position, origin in enumerate(origins):
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                self.error(
                    f"{path}.allow_origins[{position}]",
                    f'{_quote(origin)} is not "*" or an origin like "https://app.example.com"',
                )
        if "*" in origins and cors.allow_credentials is True:
            # Fetch standard, CORS protocol: a credentialed response may not say "*".
            self.error(
                f"{path}.allow_credentials",
                'cannot be true with allow_origins = ["*"]; list the origins instead',
            )
        methods = _or(cors.allow_methods, list(_CORS.allow_methods))
        self.methods(f"{path}.allow_methods", methods, star=True)
        allow_headers = _or(cors.allow_headers, list(_CORS.allow_headers))
        self.tokens(f"{path}.allow_headers", allow_headers, "header name", star=True)
        expose_headers = _or(cors.expose_headers, list(_CORS.expose_headers))
        self.tokens(f"{path}.expose_headers", expose_headers, "header name", star=True)
        self.duration(f"{path}.max_age", cors.max_age, zero_ok=True)
        return CorsConfig(
            allow_origins=tuple(origins),
            allow_methods=tuple(dict.fromkeys(method.upper() for method in methods)),
            allow_headers=tuple(allow_headers),
            expose_headers=tuple(expose_headers),
            allow_credentials=_or(cors.allow_credentials, _CORS.allow_credentials),
            max_age=_or(cors.max_age, _CORS.max_age),
        )

    def route_cache(self, raw: object, path: str, has_cache: bool) -> RouteCacheConfig | None:
        cache, _ = self.decode(raw, _RawRouteCache, path)
        if cache is None:
            return None
        if not has_cache:
            # A route cannot cache without the store; silently not caching
            # would hide the mistake until production traffic shows it.
            self.error(path, "needs a top-level [cache] table (the shared store)")
        self.duration(f"{path}.ttl", cache.ttl, zero_ok=True)
        self.duration(f"{path}.stale_if_error", cache.stale_if_error, zero_ok=True)
        return RouteCacheConfig(
            ttl=_or(cache.ttl, _ROUTE_CACHE.ttl),
            stale_if_error=_or(cache.stale_if_error, _ROUTE_CACHE.stale_if_error),
        )

    def cache(self, raw: object) -> CacheConfig | None:
        cache, dropped = self.decode(raw, _RawCache, "cache")
        if cache is None:
            return None
        self.count("cache.max_bytes", cache.max_bytes, minimum=1)
        self.count("cache.max_entry_bytes", cache.max_entry_bytes, minimum=1)
        max_bytes = _or(cache.max_bytes, _CACHE.max_bytes)
        max_entry = _or(cache.max_entry_bytes, min(_CACHE.max_entry_bytes, max_bytes))
        if max_entry > max_bytes and not dropped & {"max_bytes", "max_entry_bytes"}:
            self.error("cache.max_entry_bytes", f"must not be over cache.max_bytes ({max_bytes})")
        return CacheConfig(max_bytes=max_bytes, max_entry_bytes=max_entry)

    # -- the document --------------------------------------------------------

    def document(self, doc: dict[str, Any], path: str, sha256: str) -> Config | None:
        for key in doc:
            if key not in _TOP_LEVEL:
                self.error(_key(key), "unknown key", _close(key, _TOP_LEVEL))
        server = self.server(doc.get("server", {}))
        defaults = self.defaults(doc.get("defaults", {}))
        cache: CacheConfig | None = None
        if "cache" in doc:
            cache = self.cache(doc["cache"])

        upstreams: dict[str, UpstreamConfig] = {}
        raw_upstreams = self.table(doc.get("upstreams", {}), "upstreams") or {}
        for name, raw in raw_upstreams.items():
            if (upstream := self.upstream(name, raw)) is not None:
                upstreams[name] = upstream

        policies: dict[str, AuthPolicy] = {}
        raw_auth = self.table(doc.get("auth", {}), "auth") or {}
        base = os.path.dirname(path) if path != "<string>" else ""
        for name, raw in raw_auth.items():
            if (policy := self.policy(name, raw, base)) is not None:
                policies[name] = policy

        routes: list[RouteConfig] = []
        raw_routes = doc.get("routes", [])
        if not isinstance(raw_routes, list):
            self.error("routes", f"Expected `array` of tables, got `{_type_name(raw_routes)}`")
            raw_routes = []
        names: dict[str, int] = {}
        for index, raw in enumerate(raw_routes):
            route = self.route(
                index,
                raw,
                defaults,
                set(raw_upstreams),
                names,
                raw_auth,
                has_cache="cache" in doc,
            )
            if route is not None:
                routes.append(route)

        redis: RedisConfig | None = None
        if "redis" in doc:
            redis = self.redis(doc["redis"])
        else:
            for route in routes:
                if route.rate_limit is not None and route.rate_limit.store == "redis":
                    where = f"routes[{route.index}] ({_quote(route.name)})"
                    self.error(
                        f"{where}.rate_limit.store",
                        'needs a [redis] table (its url) for store = "redis"',
                    )

        if self.errors or server is None:
            return None
        return Config(
            server=server,
            upstreams=upstreams,
            routes=tuple(routes),
            cache=cache,
            redis=redis,
            path=path,
            sha256=sha256,
            auth=policies,
        )


def parse(text: str | bytes, path: str = "<string>") -> Config:
    """Decode and validate one routes.toml; raise `ConfigError` listing every problem."""
    data = text.encode() if isinstance(text, str) else text
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        # utf-8-sig: tolerate the BOM some editors write.
        source = data.decode("utf-8-sig")
        doc = tomllib.loads(source)
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 (byte {exc.start})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    loader = _Loader(source)
    config = loader.document(doc, path, sha256)
    if config is None:
        raise ConfigError(loader.errors)
    _release(doc)
    return config


def _release(doc: dict[str, Any]) -> None:
    """Drop a parsed document a table at a time.

    A reload parses in a worker thread; 120,000 `[[routes]]` tables are some
    half a million objects, and freed with the document in one go they are
    one deallocation cascade that holds the GIL (30 ms and more) while the
    event loop waits for it. Popped one table per step, the GIL can change
    hands between any two.
    """
    for value in doc.values():
        if isinstance(value, list):
            while value:
                value.pop()
        elif isinstance(value, dict):
            while value:
                value.popitem()


def load(path: str) -> Config:
    """Read `path` and `parse()` it; an unreadable file is a `ConfigError` too."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    return parse(data, path)


# --------------------------------------------------------------------------
# `gateway check` output
# --------------------------------------------------------------------------


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _route_match(route: RouteConfig) -> str:
    parts: list[str] = []
    if route.host is not None:
        parts.append(f"host {route.host}")
    if route.path is not None:
        parts.append(f"path {route.path}")
    if route.path_regex is not None:
        parts.append(f"regex {route.path_regex}")
    if route.methods is not None:
        parts.append(f"methods {','.join(route.methods)}")
    if route.headers:
        parts.append("headers " + ",".join(f"{name}={value}" for name, value in route.headers))
    return "  ".join(parts)


def _route_limits(route: RouteConfig) -> str:
    body = "unlimited" if route.max_body_bytes == 0 else f"{route.max_body_bytes} bytes"
    parts = [
        f"connect {_seconds(route.connect_timeout)}",
        f"read {_seconds(route.read_timeout)}",
        f"body {body}",
        f"retries {route.retries}",
    ]
    if route.priority:
        parts.append(f"priority {route.priority}")
    if route.strip_prefix:
        parts.append("strip_prefix")
    if not route.preserve_host:
        parts.append("target Host")
    if route.rate_limit is not None:
        limit = route.rate_limit
        parts.append(f"rate_limit {limit.rate:g}/s burst {limit.burst} by {limit.key}")
        if limit.store != "local":
            parts.append(f"store {limit.store}")
    if route.cors is not None:
        parts.append(f"cors {' '.join(route.cors.allow_origins)}")
    if route.auth:
        parts.append(f"auth {'|'.join(route.auth)}")
    if route.cache is not None:
        cache = route.cache
        parts.append(
            f"cache ttl {_seconds(cache.ttl)} stale_if_error {_seconds(cache.stale_if_error)}"
        )
    return ", ".join(parts)


def _listen_item(position: int, server: ServerConfig) -> str:
    address = server.listen[position]
    return f"{address} (tls)" if position in server.tls_listen else address


def summary(config: Config) -> str:
    """The one-screen text `gateway check` prints for a valid config."""
    server = config.server
    lines = [
        f"config     {config.path} (sha256 {config.sha256[:12]})",
        f"listen     {', '.join(_listen_item(i, server) for i in range(len(server.listen)))}",
        f"admin      {server.admin or 'off'}",
        f"access_log {server.access_log}, drain {_seconds(server.drain_timeout)}, "
        f"client_timeout {_seconds(server.client_timeout)}, "
        f"trusted_proxies {', '.join(server.trusted_proxies) or 'none'}",
    ]
    if server.certificates:
        lines.insert(
            3,
            f"tls        min {server.tls.min_version}; certificates "
            + ", ".join(
                f"{c.cert} ({' '.join(c.hosts) or 'default'})" for c in server.certificates
            ),
        )
    if config.cache is not None:
        lines.append(
            f"cache      {config.cache.max_bytes} bytes, "
            f"entries up to {config.cache.max_entry_bytes} bytes"
        )
    if server.workers != 1:
        lines.insert(3, f"workers    {server.workers or 'one per CPU'}")
    if config.redis is not None:
        # The URL may carry a password: only its scheme and host are shown.
        redis_url = yarl.URL(config.redis.url)
        where = (
            redis_url.path if redis_url.scheme == "unix" else f"{redis_url.host}:{redis_url.port}"
        )
        lines.insert(
            4, f"redis      {redis_url.scheme}://{where}, timeout {_seconds(config.redis.timeout)}"
        )
    lines.append(f"upstreams  {len(config.upstreams)}")
    for name, upstream in config.upstreams.items():
        health = "passive health only"
        if upstream.health is not None:
            health = f"health {upstream.health.path} every {_seconds(upstream.health.interval)}"
        breaker = upstream.breaker
        panic = upstream.panic_threshold
        lines.append(
            f"  {name}: {upstream.balancer}, {health}, "
            f"breaker {breaker.failures} failures/{_seconds(breaker.cooldown)}"
            f"..{_seconds(breaker.max_cooldown)}, "
            + (f"panic below {panic:.0%} available" if panic > 0 else "panic off")
        )
        for target in upstream.targets:
            lines.append(f"    {target.url} weight {target.weight}")
        for found in upstream.discover:
            lines.append(
                f"    {found.kind} {found.written} every {_seconds(upstream.dns_refresh)}"
                + (f" via {', '.join(upstream.nameservers)}" if upstream.nameservers else "")
            )
    if config.auth:
        lines.append(f"auth       {len(config.auth)}")
    for name, policy in config.auth.items():
        if isinstance(policy, JwtPolicy):
            source = policy.jwks_file or policy.jwks_url or "secret_env"
            lines.append(f"  {name}: jwt {','.join(policy.algorithms)} keys from {source}")
        else:
            lines.append(
                f"  {name}: api_key in {policy.header}, {len(policy.consumers)} consumers "
                f"from {policy.keys_file}"
            )
    lines.append(f"routes     {len(config.routes)}")
    for route in config.routes:
        answer = route.upstream or f"redirect {route.redirect_status}"
        lines.append(f"  {route.name}: {_route_match(route)} -> {answer}")
        lines.append(f"    {_route_limits(route)}")
    return "\n".join(lines)
