"""Route matching, compiled once per config, and the request target sent upstream.

`RouteTable(routes).match(method, host, raw_path, headers)` returns the winning
`RouteConfig` or raises `NoRoute` (404) / `MethodNotAllowed` (405 with `Allow`).

Rules (CONTRACT.md, "routes.toml" and its "Details"):

- **host**: exact, ignoring case and port (RFC 9110 §4.2.3: the host is
  case-insensitive; RFC 3986 §3.2.2: an IPv6 literal is bracketed, so
  ``[::1]:8080`` is the host ``::1``); one trailing dot is dropped (an absolute
  DNS name, RFC 1034 §3.1, names the same host). ``*.example.com`` matches one
  or more labels in front (``a.example.com``, ``a.b.example.com``), never
  ``example.com`` itself. ``*`` or no host matches every host, including a
  request without one.
- **path**: a prefix on segment boundaries, compared with the *raw* path
  (still percent-encoded, no query): ``/api/users`` matches ``/api/users``,
  ``/api/users/`` and ``/api/users/7``, never ``/api/usersX`` nor
  ``/api/users%2F7`` (``%2F`` is data, not a delimiter: RFC 3986 §2.2).
  A configured path ending in ``/`` is a plain string prefix whose boundary is
  already included: ``/api/`` matches ``/api/`` and ``/api/x`` but **not**
  ``/api`` (the operator wrote the slash on purpose, as with Traefik's
  ``PathPrefix(`/api/`)``; write ``/api`` to get both). ``/`` matches every
  path. Paths compare case-sensitively and byte-for-byte (RFC 3986 §6.2.2.1:
  only scheme and host are case-insensitive; ``%2f`` and ``%2F`` are not
  folded, the raw target is what the gateway forwards).
- **path_regex**: ``re.search`` against the raw path; patterns anchor
  themselves with ``^``/``$``.
- **headers**: every configured (name, value) must be present with exactly
  that value (names case-insensitive per RFC 9110 §5.1, values compared
  exactly); with a repeated header, any one field line matching is enough.
- **methods**: exact, case-sensitive tokens (RFC 9110 §9.1); ``GET`` admits
  ``HEAD`` (RFC 9110 §9.3.2: HEAD is GET without content); absent = all.

Order: higher ``priority`` first; then the longer *literal prefix* first —
a path route's is its ``path`` (``/`` counts as 0: it constrains nothing), a
regex route's is the literal text after its leading ``^`` up to the first
metacharacter (``^/v[0-9]+/users$`` -> ``/v``, 2; unanchored or with a ``|``:
0); on an equal length a regex route comes before a path route (it pins the
same prefix and constrains the rest); then file order (``RouteConfig.index``).
So a catch-all ``path = "/"`` never shadows a regex route of equal priority,
while ``/api/users`` still beats ``^/api/.*``.

405: only when at least one route matches host, path and headers but none of
those admits the method; ``Allow`` is the sorted union of their methods
(RFC 9110 §15.5.6 requires the header on a 405).

Speed: a trie over the whole segments a route pins down (``/api/users``
pins ``api``, ``users``; a regex, the whole segments of its literal prefix:
``^/api/v[0-9]+`` pins ``api``). Each route sits in exactly one node, in
that node's list for its exact host or its any-host list, every list in
match order, so building is linear in the routes (after one sort). A request
walks down by its own segments and scans the lists of the nodes it passed
(deepest first, its own host's and the any-host ones), each up to its first
full match or to the first route ranked below the best match so far; the
lowest rank wins. The full checks still run on each candidate, so the trie
and the host lists only filter and never change the result.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TypeAlias

from multidict import MultiMapping

from gateway.core.config import RouteConfig
from gateway.core.errors import MethodNotAllowed, NoRoute

__all__ = [
    "RouteTable",
    "forward_path",
    "has_dot_segment",
    "normalize_host",
    "regex_literal_prefix",
    "shadowed_routes",
]

# One compiled route, as a flat tuple: unpacking a tuple in the `for` header is
# the cheapest per-route access CPython offers on the hot path.
#   rank (position in match order), route, prefix (None = any path), prefix
#   length, segment-boundary check needed, compiled regex (None = none), exact
#   host (None = any), wildcard suffix ".example.com" (None = not a wildcard),
#   required headers, admitted methods (None = all)
_Compiled: TypeAlias = tuple[
    int,
    RouteConfig,
    str | None,
    int,
    bool,
    re.Pattern[str] | None,
    str | None,
    str | None,
    tuple[tuple[str, str], ...],
    frozenset[str] | None,
]

_MAX_MESSAGE_PATH: Final = 200  # keep a 404 message readable for an 8 KiB target


def normalize_host(host: str | None) -> str | None:
    """The comparable form of a Host header value or configured host.

    Lower-cased, port dropped, IPv6 brackets removed, one trailing dot
    dropped; None or "" gives None (a request without a Host: RFC 9112 §3.2
    makes it a 400 for HTTP/1.1, but HTTP/1.0 clients may omit it).
    """
    if not host:
        return None
    if host[0] == "[":
        # RFC 3986 §3.2.2: IP-literal = "[" IPv6address "]", then ":port".
        end = host.find("]")
        return (host[1:end] if end > 0 else host).lower()
    if ":" in host:
        name, _, port = host.partition(":")
        if ":" not in port:
            host = name  # "name:port"; two or more colons = bare IPv6, keep
    if host[-1:] == ".":
        host = host[:-1]
    return host.lower() or None


def _pinned_segments(path: str | None) -> tuple[str, ...]:
    """The leading whole segments every path matched by this prefix must have.

    "/api/users" -> ("api", "users"): segment-boundary matching admits only
    "/api/users" and "/api/users/...". "/api/" -> ("api",). Nothing is pinned
    for no path (regex-only or catch-all routes), "/" (everything), or a
    prefix that does not start with "/".
    """
    if path is None or not path.startswith("/"):
        return ()
    segments = path[1:].split("/")
    if segments[-1] == "":
        segments.pop()  # "/api/": the trailing "/" pins no further segment
    return tuple(segments)


_REGEX_META: Final = frozenset(".^$*+?{}[]\\|()")
_MAY_REPEAT_ZERO: Final = frozenset("*?{")


def regex_literal_prefix(pattern: str) -> str:
    """The literal text every match of an anchored pattern starts with.

    Used only to rank regex routes against path routes. Conservative: "" when
    the pattern is not anchored with "^" or "\\A", or has a "|" anywhere (an
    alternative could bypass the prefix); stops at the first metacharacter,
    and drops the last literal when it is made optional ("^/ab?" -> "/a").
    Escaped punctuation ("\\.") is literal; escapes like "\\d" stop the scan.
    """
    if "|" in pattern:
        return ""
    if pattern.startswith("^"):
        i = 1
    elif pattern.startswith("\\A"):
        i = 2
    else:
        return ""
    out: list[str] = []
    n = len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            if i + 1 < n and not pattern[i + 1].isalnum():
                out.append(pattern[i + 1])
                i += 2
                continue
            break
        if ch in _REGEX_META:
            if ch in _MAY_REPEAT_ZERO and out:
                out.pop()
            break
        out.append(ch)
        i += 1
    return "".join(out)


def _compile(rank: int, route: RouteConfig) -> _Compiled:
    prefix = route.path
    boundary = False
    if prefix is not None:
        if prefix == "/":
            prefix = None  # matches every path: skip the check entirely
        else:
            boundary = not prefix.endswith("/")
    regex = re.compile(route.path_regex) if route.path_regex is not None else None

    host_exact: str | None = None
    host_suffix: str | None = None
    if route.host is not None and route.host.strip() not in ("", "*"):
        raw = route.host.strip()
        if raw.startswith("*."):
            # "*.example.com" -> ".example.com": the request host must end
            # with it and have at least one more character (label) before.
            host_suffix = "." + (normalize_host(raw[2:]) or "")
        else:
            host_exact = normalize_host(raw)

    methods: frozenset[str] | None = None
    if route.methods is not None:
        upper = {m.upper() for m in route.methods}
        if "GET" in upper:
            upper.add("HEAD")  # RFC 9110 §9.3.2
        methods = frozenset(upper)

    headers = tuple((name.lower(), value) for name, value in route.headers)
    return (
        rank,
        route,
        prefix,
        len(prefix) if prefix is not None else 0,
        boundary,
        regex,
        host_exact,
        host_suffix,
        headers,
        methods,
    )


def _order_key(route: RouteConfig) -> tuple[int, int, int, int]:
    """Sort key: priority, then the longer literal prefix, regex first on a tie.

    A path route's literal is its path, but "/" (and no path at all) counts
    as 0: it constrains nothing, and must not shadow regex routes of the same
    priority. A regex route's literal is `regex_literal_prefix`. On equal
    length a regex route comes first: it pins the same prefix and then
    constrains the rest, so it is at least as specific. Then file order.
    """
    if route.path_regex is not None and route.path is None:
        return (-route.priority, -len(regex_literal_prefix(route.path_regex)), 0, route.index)
    length = 0 if route.path in (None, "/") else len(route.path or "")
    return (-route.priority, -length, 1, route.index)


def _route_pins(route: RouteConfig) -> tuple[str, ...]:
    """The whole leading segments every path this route matches must have.

    From `path` when there is one; else from a regex's literal prefix, whole
    segments only ("^/api/v[0-9]+" has the literal "/api/v": ("api",), since
    "v" may go on). Every match of the regex starts with that literal (see
    `regex_literal_prefix`), so this only narrows candidates, never drops a
    route that could match.
    """
    if route.path is not None:
        return _pinned_segments(route.path)
    if route.path_regex is None:
        return ()
    literal = regex_literal_prefix(route.path_regex)
    if not literal.startswith("/"):
        return ()
    return tuple(literal[1:].split("/")[:-1])


def _headers_match(headers: Mapping[str, str], required: tuple[tuple[str, str], ...]) -> bool:
    for name, value in required:
        got = headers.get(name)
        if got == value:
            continue
        if got is None or not isinstance(headers, MultiMapping):
            return False
        # A repeated field: any one line carrying exactly the value counts.
        if value not in headers.getall(name, ()):
            return False
    return True


_NOTHING: Final[tuple[_Compiled, ...]] = ()
_NO_RANK: Final = 1 << 62  # above every route's rank


class _Node:
    """One trie level: the routes pinned exactly down to here, in match order.

    `anyhost` holds those without an exact host (any host or a wildcard);
    `hosts` those with one, keyed by the normalised host, so a request scans
    only its own host's routes. Each route is in exactly one list of one
    node: the table is linear in the routes, however many pin nothing.
    """

    __slots__ = ("anyhost", "children", "hosts")

    def __init__(self) -> None:
        self.anyhost: tuple[_Compiled, ...] = _NOTHING
        self.hosts: dict[str, tuple[_Compiled, ...]] | None = None
        self.children: dict[str, _Node] | None = None


class RouteTable:
    """Every route of one config, compiled once; `match` runs per request.

    Built in time linear in the routes (after one sort) and without touching
    the event loop's objects, so a reload can build it in a worker thread.
    """

    __slots__ = ("_root", "routes")

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        ordered = sorted(routes, key=_order_key)
        #: The routes in match order (highest precedence first).
        self.routes: tuple[RouteConfig, ...] = tuple(ordered)

        # Each route goes to the node of the segments it pins ("/api/users":
        # api -> users), in the list of its exact host or the any-host list.
        # Routes arrive in match order, so every list is sorted by rank.
        root = _Node()
        anyhost: dict[_Node, list[_Compiled]] = {}
        hosts: dict[_Node, dict[str, list[_Compiled]]] = {}
        for rank, route in enumerate(ordered):
            compiled = _compile(rank, route)
            node = root
            for segment in _route_pins(route):
                children = node.children
                if children is None:
                    children = node.children = {}
                child = children.get(segment)
                if child is None:
                    child = children[segment] = _Node()
                node = child
            host = compiled[6]
            if host is None:
                anyhost.setdefault(node, []).append(compiled)
            else:
                hosts.setdefault(node, {}).setdefault(host, []).append(compiled)
        # Tuples, once: smaller than lists, and the table never changes.
        for node, found in anyhost.items():
            node.anyhost = tuple(found)
        for node, by_host in hosts.items():
            node.hosts = {host: tuple(found) for host, found in by_host.items()}
        self._root = root

    def parts(self) -> list[object]:
        """Every object the table is made of, parents before children, for
        `state.snapshot.dismantle` (freeing a retired table piece by piece)."""
        out: list[object] = [self.routes]
        nodes = [self._root]
        while nodes:
            node = nodes.pop()
            out.append(node)
            out.append(node.anyhost)
            out.extend(node.anyhost)
            if node.hosts is not None:
                out.append(node.hosts)
                for found in node.hosts.values():
                    out.append(found)
                    out.extend(found)
            if node.children is not None:
                out.append(node.children)
                nodes.extend(node.children.values())
        out.extend(self.routes)
        return out

    def match(
        self,
        method: str | None,
        host: str | None,
        raw_path: str,
        headers: Mapping[str, str],
    ) -> RouteConfig:
        """The winning route for this request, or NoRoute / MethodNotAllowed.

        `raw_path` is the raw, percent-encoded path without the query;
        `headers` must be case-insensitive (a CIMultiDictProxy in practice).
        `method=None` ignores the routes' methods: a CORS preflight belongs to
        the route of the request it announces, whatever that route's methods.
        """
        # The nodes along the request's own segments ("/api/users/7": root,
        # api, users, 7 while the trie has them); only their routes can match.
        node = self._root
        path_nodes = [node]
        if node.children is not None and raw_path[:1] == "/":
            start = 1
            while True:
                end = raw_path.find("/", start)
                child = node.children.get(raw_path[start:] if end < 0 else raw_path[start:end])
                if child is None:
                    break
                node = child
                path_nodes.append(node)
                if end < 0 or node.children is None:
                    break
                start = end + 1

        host_key: str | None = None
        host_done = False
        lists: list[tuple[_Compiled, ...]] = []
        # Deepest first: its routes pin the most, so they tend to rank first,
        # and every later list stops at its first route ranked below the winner.
        for node in reversed(path_nodes):
            if node.anyhost:
                lists.append(node.anyhost)
            if node.hosts is not None:
                if not host_done:
                    host_key = normalize_host(host)
                    host_done = True
                if host_key is not None and (found := node.hosts.get(host_key)) is not None:
                    lists.append(found)

        best: RouteConfig | None = None
        best_rank = _NO_RANK
        allowed: set[str] | None = None
        for candidates in lists:
            for (
                rank,
                route,
                prefix,
                plen,
                boundary,
                regex,
                host_exact,
                host_suffix,
                required,
                methods,
            ) in candidates:
                if rank >= best_rank:
                    break  # this list has nothing ranked above the winner so far
                if prefix is not None:
                    if not raw_path.startswith(prefix):
                        continue
                    if boundary and len(raw_path) > plen and raw_path[plen] != "/":
                        continue  # "/api/usersX" against "/api/users"
                if regex is not None and regex.search(raw_path) is None:
                    continue
                if host_exact is not None or host_suffix is not None:
                    if not host_done:
                        host_key = normalize_host(host)
                        host_done = True
                    if host_key is None:
                        continue
                    if host_exact is not None:
                        if host_key != host_exact:
                            continue
                    elif host_suffix is not None and not (
                        host_key.endswith(host_suffix) and len(host_key) > len(host_suffix)
                    ):
                        continue
                if required and not _headers_match(headers, required):
                    continue
                if methods is not None and method is not None and method not in methods:
                    if allowed is None:
                        allowed = set()
                    allowed |= methods
                    continue
                best = route
                best_rank = rank
                break

        if best is not None:
            return best
        # No winner: every list was scanned whole, so `allowed` is the union
        # over every route that matched all but the method.
        if allowed is not None:
            raise MethodNotAllowed(tuple(sorted(allowed)))
        shown = raw_path
        if len(shown) > _MAX_MESSAGE_PATH:
            shown = shown[:_MAX_MESSAGE_PATH] + "..."
        raise NoRoute(f"no route matches {method} {shown}" + (f" on host {host}" if host else ""))


_SCAN_PER_BUCKET: Final = 64  # bounds `shadowed_routes` on many look-alike routes


def _methods_of(route: RouteConfig) -> frozenset[str] | None:
    if route.methods is None:
        return None
    methods = set(route.methods)
    if "GET" in methods:
        methods.add("HEAD")  # RFC 9110 §9.3.2
    return frozenset(methods)


def _host_keys(host: str | None) -> list[str]:
    """The bucket keys of every configured host that admits all of `host`'s requests."""
    if host is None or host.strip() in ("", "*"):
        return ["*"]
    raw = host.strip().lower()
    if raw.startswith("*."):
        labels = (normalize_host(raw[2:]) or "").split(".")
        own = ["*." + ".".join(labels[i:]) for i in range(len(labels))]
        return ["*", *own]
    name = normalize_host(raw) or ""
    labels = name.split(".")
    return ["*", name, *("*." + ".".join(labels[i:]) for i in range(1, len(labels)))]


def _own_host_key(host: str | None) -> str:
    if host is None or host.strip() in ("", "*"):
        return "*"
    raw = host.strip().lower()
    if raw.startswith("*."):
        return "*." + (normalize_host(raw[2:]) or "")
    return normalize_host(raw) or ""


def _path_keys(route: RouteConfig) -> list[str]:
    """Bucket keys of every path constraint that admits all of `route`'s paths.

    "" is no constraint (no path, or "/"); "/a" and "/a/" cover "/a/b..."; a
    regex is covered by path prefixes its literal passes on a boundary, and
    by itself ("re:" + pattern).
    """
    keys = [""]
    if route.path is not None and route.path_regex is not None:
        return keys  # both: checked together, covered only by a catch-all here
    if route.path_regex is not None:
        literal = regex_literal_prefix(route.path_regex)
        if literal.startswith("/"):
            for i, ch in enumerate(literal):
                if ch == "/" and i > 0:
                    keys += [literal[:i], literal[: i + 1]]
        keys.append("re:" + route.path_regex)
        return keys
    path = route.path
    if path is None or path == "/":
        return keys
    for i, ch in enumerate(path):
        if ch == "/" and i > 0:
            keys += [path[:i], path[: i + 1]]
    keys.append(path)
    return keys


def _own_path_key(route: RouteConfig) -> str | None:
    if route.path is not None and route.path_regex is not None:
        return None  # never listed as a shadower: only "" covers it, conservatively
    if route.path_regex is not None:
        return "re:" + route.path_regex
    return "" if route.path in (None, "/") else route.path


def shadowed_routes(routes: Sequence[RouteConfig]) -> list[tuple[RouteConfig, RouteConfig]]:
    """(route, earlier) pairs: `route` can never match, `earlier` wins first.

    `earlier` comes first in match order and admits every request `route`
    admits: its host, path (or regex), headers and methods are each the same
    or wider. Conservative: a route reported here never matches (nor adds to
    a 405's Allow, `earlier` covering its methods), but a route shadowed in a
    way these rules do not see (by a regex that happens to cover a path, by
    several routes together) is not reported. Linear in the routes: earlier
    routes are looked up by the path prefixes and host suffixes that could
    cover each route, at most a bounded number per bucket.
    """
    buckets: dict[tuple[str, str], list[tuple[RouteConfig, frozenset[tuple[str, str]]]]] = {}
    found: list[tuple[RouteConfig, RouteConfig]] = []
    for route in sorted(routes, key=_order_key):
        headers = frozenset((name.lower(), value) for name, value in route.headers)
        methods = _methods_of(route)
        winner: RouteConfig | None = None
        for path_key in _path_keys(route):
            for host_key in _host_keys(route.host):
                for other, other_headers in buckets.get((path_key, host_key), ())[
                    :_SCAN_PER_BUCKET
                ]:
                    other_methods = _methods_of(other)
                    if other_headers <= headers and (
                        other_methods is None or (methods is not None and methods <= other_methods)
                    ):
                        winner = other
                        break
                if winner is not None:
                    break
            if winner is not None:
                break
        if winner is not None:
            found.append((route, winner))
        own = _own_path_key(route)
        if own is not None:
            buckets.setdefault((own, _own_host_key(route.host)), []).append((route, headers))
    return found


# A dot-segment ("." or "..", any dot percent-encoded) between two segment
# boundaries. Besides "/", a boundary is what some target may take for one
# after its own decoding: "%2F" (a backend that decodes it before normalising,
# as Tomcat with ALLOW_ENCODED_SLASH or an app behind a decoding framework
# does), "\\" and "%5C" (IIS, ASP.NET and Windows paths), and at the end "#"
# (a fragment, which a target's URL parser cuts off) or ";" (path parameters:
# Tomcat and Jetty read "..;x" as ".."; the nginx-in-front-of-Tomcat escape).
_DOT_SEGMENT: Final = re.compile(
    r"(?:^|[/\\]|%2[fF]|%5[cC])(?:\.|%2[eE]){1,2}(?=$|[/\\;#]|%2[fF]|%5[cC])"
)


def has_dot_segment(raw_path: str) -> bool:
    """Whether a raw path (no query) holds a dot-segment a target might resolve.

    CONTRACT.md "On the wire": such a path is refused with 400, since a
    route's prefix must confine what reaches its target whatever the target
    normalises: "/api/../internal" passes the "/api" route but a target that
    removes dot-segments (RFC 3986 §5.2.4) serves "/internal". The gateway
    itself forwards the raw bytes and rewrites nothing, so refusing is the
    only safe answer (nginx normalises instead; we do not, see forward_path).

    Segments are "." or ".." spelled with "." or "%2e"/"%2E" in any mix;
    boundaries are "/" and the encoded or backslash spellings above. Names
    that merely contain dots ("...", ".hidden", "a.b", "..a") pass, and so
    does "%252e" (an encoded "%", which only a target decoding twice would
    turn into a dot).
    """
    if "." not in raw_path and "%" not in raw_path:
        return False  # the usual path, without a regex search
    return _DOT_SEGMENT.search(raw_path) is not None


def forward_path(
    route: RouteConfig,
    raw_path: str,
    raw_query: str | None,
    base_path: str,
    rewrite: Callable[[str], str] | None = None,
) -> str:
    """The request target sent upstream: raw bytes in, raw bytes out.

    CONTRACT.md "On the wire": no re-encoding, no dot-segment removal, no %2F
    rewriting (RFC 3986 §6.2.2.3 normalisation is for comparison, and a proxy
    that rewrites lets a client reach paths its routes never admitted).

    - `strip_prefix` with a `path`: the prefix goes ("/api/users/7" -> "/7"),
      the path equal to the prefix gives "/", and a configured "/api/" strips
      "/api" so the remainder keeps its leading "/".
    - The target URL's own path `base_path` is joined without doubling or
      dropping a "/": "/base" or "/base/" + "/7" -> "/base/7"; "" + "/7" -> "/7".
    - `raw_query` None means the request had no "?"; "" means a bare "?",
      which is kept (the two are different targets, RFC 3986 §6.2.3).
    """
    path = raw_path
    if route.strip_prefix and route.path:
        prefix = route.path[:-1] if route.path.endswith("/") else route.path
        rest = path[len(prefix) :]
        # Only on a segment boundary, as matched; a path the route could not
        # have matched ("/api/usersX") is left whole rather than cut mid-segment.
        if path.startswith(prefix) and (not rest or rest[0] == "/"):
            path = rest
    if rewrite is not None:
        # `[routes.rewrite]`: on the raw path, after strip_prefix (CONTRACT.md).
        path = rewrite(path or "/")
    if not path:
        path = "/"  # RFC 9112 §3.2.1: origin-form is at least "/"
    elif rewrite is not None and path[0] != "/":
        path = "/" + path

    if base_path.endswith("/"):
        base_path = base_path[:-1]
    if base_path:
        # A target like "*" (RFC 9112 §3.2.4) has no leading "/" to join on.
        path = base_path + path if path.startswith("/") else base_path + "/" + path
    if raw_query is not None:
        return path + "?" + raw_query
    return path
