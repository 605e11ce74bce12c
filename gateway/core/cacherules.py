"""RFC 9111 (HTTP caching) rules for a shared cache, as pure functions.

No clocks are read here: every function takes the instants it needs. Wall
time (`*_wall`, unix seconds) is only used where HTTP dates are compared
(Date, Expires); ages run on the caller's monotonic clock once stored.

What is stored (CONTRACT.md "Response cache"): only responses to GET, with
status 200, 203, 204, 301, 308, 404 or 410; never `no-store`, `private`,
`Set-Cookie` or `Vary: *`. Freshness: `s-maxage`, then `max-age`, then
`Expires` (minus `Date`), then the route's `ttl` (in place of RFC 9111
4.2.2's heuristics). On a route with `auth`, and for a request carrying
`Authorization` (RFC 9111 3.5), only `public` or `s-maxage` responses (and,
for `Authorization` on a public route, `must-revalidate`) are stored.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Iterable, Mapping
from typing import Final

# RFC 9111 3 (and CONTRACT.md): statuses a response may be stored with.
STORABLE_STATUSES: Final = frozenset({200, 203, 204, 301, 308, 404, 410})
# RFC 9111 4.4: a non-error response to these invalidates the stored URL.
UNSAFE_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# RFC 9111 1.2.2: delta-seconds beyond 2**31 are taken as 2**31.
MAX_DELTA: Final = 2**31

Directives = Mapping[str, str | None]


def parse_cache_control(values: Iterable[str]) -> dict[str, str | None]:
    """`Cache-Control` field values as {directive: argument or None}.

    Directive names are case-insensitive (RFC 9111 5.2); a quoted argument
    is unquoted. The first occurrence of a directive wins; a comma inside
    a quoted string (`no-cache="a, b"`) does not split it.
    """
    out: dict[str, str | None] = {}
    for value in values:
        for part in _split_commas(value):
            name, eq, arg = part.partition("=")
            name = name.strip().lower()
            if not name:
                continue
            argument: str | None = None
            if eq:
                argument = arg.strip()
                if len(argument) >= 2 and argument[0] == argument[-1] == '"':
                    argument = argument[1:-1].replace('\\"', '"')
            out.setdefault(name, argument)
    return out


def _split_commas(value: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def delta_seconds(argument: str | None) -> int | None:
    """A directive's delta-seconds (RFC 9111 1.2.2), None when invalid."""
    if argument is None or not argument.isascii() or not argument.isdigit():
        return None
    return min(int(argument), MAX_DELTA)


def http_date(value: str | None) -> float | None:
    """An HTTP-date (RFC 9110 5.6.7) as unix seconds; None when absent or invalid."""
    if value is None:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    try:
        timestamp = parsed.timestamp()
    except (OverflowError, ValueError, OSError):
        return None
    return timestamp if math.isfinite(timestamp) else None


def refusal(
    status: int,
    directives: Directives,
    set_cookie: bool,
    vary: Iterable[str],
    *,
    shared_only: bool,
    authorization: bool,
) -> str | None:
    """Why a GET response may not be stored (a Cache-Status `detail`), or None.

    `shared_only`: the route has `auth`: only `public` or `s-maxage` responses.
    `authorization`: the request carried `Authorization` (RFC 9111 3.5).
    """
    if status not in STORABLE_STATUSES:
        return "status"
    if "no-store" in directives:
        return "no-store"
    if "private" in directives:
        return "private"
    if set_cookie:
        # A Set-Cookie is one client's; replaying it to others would share a session.
        return "set-cookie"
    if any(field.strip() == "*" for value in vary for field in value.split(",")):
        return "vary-star"
    shared = "public" in directives or "s-maxage" in directives
    if shared_only and not shared:
        return "auth-not-public"
    if authorization and not (shared or "must-revalidate" in directives):
        return "authorization"
    return None


def freshness_lifetime(
    directives: Directives,
    expires: str | None,
    date_wall: float | None,
    response_wall: float,
    default_ttl: float,
) -> float:
    """RFC 9111 4.2.1 for a shared cache: s-maxage, max-age, Expires - Date, ttl.

    A directive present with an invalid argument counts as 0 (stale: RFC 9111
    4.2.1 says such a response is to be treated as stale), as does an invalid
    Expires (RFC 9111 5.3). `no-cache` stores the response but makes every use
    a revalidation (lifetime 0, RFC 9111 5.2.2.4).
    """
    if "no-cache" in directives:
        return 0.0
    for name in ("s-maxage", "max-age"):
        if name in directives:
            value = delta_seconds(directives[name])
            return float(value) if value is not None else 0.0
    if expires is not None:
        expires_wall = http_date(expires)
        if expires_wall is None:
            return 0.0
        base = date_wall if date_wall is not None else response_wall
        return max(0.0, expires_wall - base)
    return max(0.0, default_ttl)


def initial_age(
    age_header: str | None,
    date_wall: float | None,
    request_wall: float,
    response_wall: float,
) -> float:
    """`corrected_initial_age` of RFC 9111 4.2.3, when the response is received.

    apparent_age = max(0, response_time - date_value) (both in whole seconds);
    corrected_age_value = age_value + (response_time - request_time);
    corrected_initial_age = max(apparent_age, corrected_age_value).
    The current age is then this plus the resident time (`current_age`).
    """
    age_value = delta_seconds(age_header.strip()) if age_header is not None else None
    # An HTTP-date has whole seconds: the response time is compared at that
    # resolution, or a Date written 0.9 s ago would age a 0.5 s ttl out at once.
    apparent = max(0.0, math.floor(response_wall) - date_wall) if date_wall is not None else 0.0
    delay = max(0.0, response_wall - request_wall)
    corrected = (age_value or 0) + delay
    return max(apparent, corrected)


def current_age(initial: float, stored_at: float, now: float) -> float:
    """RFC 9111 4.2.3: corrected_initial_age + resident_time (never negative)."""
    return initial + max(0.0, now - stored_at)


def is_fresh(lifetime: float, age: float) -> bool:
    """RFC 9111 4.2: fresh while freshness_lifetime > current_age."""
    return lifetime > age


def may_serve_stale(directives: Directives) -> bool:
    """RFC 9111 4.2.4 and 5.2.2.2/5.2.2.8: must-revalidate, proxy-revalidate,
    s-maxage (for a shared cache) and no-cache forbid serving it stale."""
    return not (
        "must-revalidate" in directives
        or "proxy-revalidate" in directives
        or "s-maxage" in directives
        or "no-cache" in directives
    )


def stale_if_error_window(directives: Directives, route_window: float) -> float:
    """Seconds past expiry a stale response may stand in for an error:
    the larger of the route's `stale_if_error` and the response's own
    `stale-if-error` directive (RFC 5861 4); 0 when it may not be served stale."""
    if not may_serve_stale(directives):
        return 0.0
    own = delta_seconds(directives.get("stale-if-error"))
    return max(route_window, float(own or 0))


def vary_fields(values: Iterable[str]) -> tuple[str, ...]:
    """The field names a `Vary` nominates, lower-cased, sorted, unique."""
    names = {
        field.strip().lower() for value in values for field in value.split(",") if field.strip()
    }
    return tuple(sorted(names))


def normalise_field(values: list[str]) -> str:
    """A nominated request field's value for matching (RFC 9111 4.1 allows
    normalising whitespace and combining field lines)."""
    return ",".join(" ".join(value.split()) for value in values)


def not_modified(
    if_none_match: str | None,
    if_modified_since: str | None,
    etag: str | None,
    last_modified: str | None,
) -> bool:
    """RFC 9110 13.2.2: whether a GET/HEAD with these preconditions gets 304.

    If-None-Match is evaluated first, with the weak comparison (13.1.2); only
    without it is If-Modified-Since looked at, and only against a valid
    Last-Modified.
    """
    if if_none_match is not None:
        if etag is None:
            return False
        if if_none_match.strip() == "*":
            return True
        mine = _weak(etag)
        return any(_weak(tag) == mine for tag in _entity_tags(if_none_match))
    if if_modified_since is not None and last_modified is not None:
        since = http_date(if_modified_since)
        modified = http_date(last_modified)
        if since is None or modified is None:
            return False
        return modified <= since
    return False


def _weak(tag: str) -> str:
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


def _entity_tags(value: str) -> list[str]:
    return [part.strip() for part in _split_commas(value) if part.strip()]


# RFC 9111 3.2 (applied by 4.3.4 on a 304): the stored header fields are
# updated from the new response, except these.
KEEP_ON_REFRESH: Final = frozenset(
    {"content-encoding", "content-length", "content-md5", "content-range", "etag"}
)
