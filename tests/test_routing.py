"""RouteTable.match and forward_path: rules, order, and laws checked by hypothesis."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.core.config import RouteConfig
from gateway.core.errors import MethodNotAllowed, NoRoute
from gateway.core.routing import (
    RouteTable,
    forward_path,
    has_dot_segment,
    normalize_host,
    regex_literal_prefix,
    shadowed_routes,
)

NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def route(index: int = 0, **kw: Any) -> RouteConfig:
    kw.setdefault("name", f"r{index}")
    kw.setdefault("upstream", "u")
    return RouteConfig(index=index, **kw)


def hdrs(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def name_of(
    table: RouteTable,
    path: str,
    *,
    method: str = "GET",
    host: str | None = "example.com",
    headers: CIMultiDictProxy[str] = NO_HEADERS,
) -> str | None:
    try:
        return table.match(method, host, path, headers).name
    except NoRoute:
        return None


# --- host ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_host", "matches"),
    [
        ("api.example.com", True),
        ("API.Example.COM", True),
        ("api.example.com:8080", True),
        ("api.example.com.", True),  # absolute DNS name, same host
        ("example.com", False),
        ("xapi.example.com", False),
        (None, False),
        ("", False),
    ],
)
def test_exact_host_ignores_case_and_port(request_host: str | None, matches: bool) -> None:
    table = RouteTable([route(host="api.example.com", path="/")])
    assert (name_of(table, "/x", host=request_host) == "r0") is matches


@pytest.mark.parametrize(
    ("request_host", "matches"),
    [("[::1]:8080", True), ("[::1]", True), ("::1", True), ("[::2]:8080", False)],
)
def test_ipv6_host_literal_port_ignored(request_host: str, matches: bool) -> None:
    table = RouteTable([route(host="[::1]", path="/")])
    assert (name_of(table, "/", host=request_host) == "r0") is matches


@pytest.mark.parametrize(
    ("request_host", "matches"),
    [
        ("a.example.com", True),
        ("a.b.example.com", True),
        ("A.Example.Com:443", True),
        ("example.com", False),
        ("xexample.com", False),
        (".example.com", False),
        ("a.example.org", False),
        (None, False),
    ],
)
def test_wildcard_host_needs_one_or_more_labels(request_host: str | None, matches: bool) -> None:
    table = RouteTable([route(host="*.example.com", path="/")])
    assert (name_of(table, "/", host=request_host) == "r0") is matches


@pytest.mark.parametrize("configured", [None, "*"])
def test_route_without_host_matches_any_host_or_none(configured: str | None) -> None:
    table = RouteTable([route(host=configured, path="/")])
    for request_host in ("a.example.com", "[::1]:1", None):
        assert name_of(table, "/", host=request_host) == "r0"


def test_normalize_host() -> None:
    assert normalize_host("Example.COM:8080") == "example.com"
    assert normalize_host("[2001:DB8::1]:443") == "2001:db8::1"
    assert normalize_host("2001:db8::1") == "2001:db8::1"  # bare v6: no port to strip
    assert normalize_host("example.com.") == "example.com"
    assert normalize_host("") is None
    assert normalize_host(None) is None


# --- path ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_path", "matches"),
    [
        ("/api/users", True),
        ("/api/users/", True),
        ("/api/users/7", True),
        ("/api/users//7", True),
        ("/api/usersX", False),
        ("/api/users%2F7", False),  # %2F is data, not a segment delimiter
        ("/api/user", False),
        ("/API/users", False),  # paths are case-sensitive
        ("/api", False),
    ],
)
def test_path_prefix_on_segment_boundaries(request_path: str, matches: bool) -> None:
    table = RouteTable([route(path="/api/users")])
    assert (name_of(table, request_path) == "r0") is matches


@pytest.mark.parametrize(
    ("request_path", "matches"),
    [("/api/", True), ("/api/x", True), ("/api", False), ("/apix", False)],
)
def test_configured_trailing_slash_requires_it(request_path: str, matches: bool) -> None:
    table = RouteTable([route(path="/api/")])
    assert (name_of(table, request_path) == "r0") is matches


@pytest.mark.parametrize("request_path", ["/", "/x", "/a/b/c", "//", "/%2F", "*"])
def test_root_path_matches_everything(request_path: str) -> None:
    table = RouteTable([route(path="/")])
    assert name_of(table, request_path) == "r0"


def test_path_regex_searches_the_raw_path() -> None:
    table = RouteTable(
        [
            route(0, path_regex=r"^/v[0-9]+/users$"),
            route(1, path_regex=r"%2F"),  # unanchored: search, not match
        ]
    )
    assert name_of(table, "/v2/users") == "r0"
    assert name_of(table, "/v2/users/") is None
    assert name_of(table, "/files/a%2Fb") == "r1"
    assert name_of(table, "/files/a/b") is None


# --- headers and methods -----------------------------------------------------


def test_headers_all_must_match_names_case_insensitive() -> None:
    table = RouteTable([route(path="/", headers=(("x-canary", "1"), ("x-team", "a")))])
    assert name_of(table, "/", headers=hdrs(("X-Canary", "1"), ("X-TEAM", "a"))) == "r0"
    assert name_of(table, "/", headers=hdrs(("X-Canary", "1"))) is None
    assert name_of(table, "/", headers=hdrs(("X-Canary", "1 "), ("x-team", "a"))) is None
    assert name_of(table, "/", headers=hdrs(("X-Canary", "1"), ("x-team", "A"))) is None


def test_repeated_header_any_line_matches() -> None:
    table = RouteTable([route(path="/", headers=(("x-canary", "1"),))])
    assert name_of(table, "/", headers=hdrs(("X-Canary", "0"), ("x-canary", "1"))) == "r0"


def test_get_admits_head_and_absent_methods_admit_all() -> None:
    table = RouteTable([route(0, path="/a", methods=("GET",)), route(1, path="/b")])
    assert name_of(table, "/a", method="HEAD") == "r0"
    assert name_of(table, "/b", method="PURGE") == "r1"


def test_405_lists_union_of_methods_sorted_with_head() -> None:
    table = RouteTable(
        [
            route(0, path="/a", methods=("POST",)),
            route(1, path="/a/b", methods=("GET", "DELETE")),
            route(2, path="/a", methods=("PATCH",), host="other.example"),  # host differs
        ]
    )
    with pytest.raises(MethodNotAllowed) as info:
        table.match("PUT", "example.com", "/a/b/c", NO_HEADERS)
    assert info.value.allowed == ("DELETE", "GET", "HEAD", "POST")
    assert info.value.headers == {"Allow": "DELETE, GET, HEAD, POST"}
    assert info.value.status == 405


def test_no_405_when_a_later_route_admits_the_method() -> None:
    table = RouteTable([route(0, path="/a/b", methods=("GET",)), route(1, path="/a")])
    assert name_of(table, "/a/b", method="POST") == "r1"


def test_404_when_nothing_matches_path_host_or_headers() -> None:
    table = RouteTable(
        [route(0, path="/a", methods=("GET",)), route(1, path="/b", host="other.example")]
    )
    with pytest.raises(NoRoute) as info:
        table.match("POST", "example.com", "/b", NO_HEADERS)
    assert info.value.status == 404
    assert "/b" in info.value.message


# --- order -----------------------------------------------------------------


def test_higher_priority_wins_over_longer_path() -> None:
    table = RouteTable([route(0, path="/a/b"), route(1, path="/a", priority=1)])
    assert name_of(table, "/a/b") == "r1"


def test_longer_path_wins_then_file_order() -> None:
    table = RouteTable([route(0, path="/a"), route(1, path="/a/b"), route(2, path="/a/b")])
    assert name_of(table, "/a/b/c") == "r1"
    assert name_of(table, "/a/c") == "r0"


def test_catch_all_root_never_shadows_a_regex_route() -> None:
    table = RouteTable([route(0, path="/"), route(1, path_regex=r"\.php$")])
    assert name_of(table, "/x/index.php") == "r1"
    assert name_of(table, "/x/index.html") == "r0"


def test_regex_ranks_by_its_literal_prefix() -> None:
    table = RouteTable(
        [
            route(0, path_regex=r"^/api/.*"),  # literal "/api/" (5)
            route(1, path="/api/users"),  # 10
            route(2, path_regex=r"^/api/users/[0-9]+$"),  # "/api/users/" (11)
            route(3, path_regex=r"^/api/users"),  # 10, regex first on a tie
        ]
    )
    assert name_of(table, "/api/users/7") == "r2"
    assert name_of(table, "/api/users/x") == "r3"
    assert name_of(table, "/api/orders") == "r0"
    assert [r.name for r in table.routes] == ["r2", "r3", "r1", "r0"]


@pytest.mark.parametrize(
    ("pattern", "literal"),
    [
        (r"^/v[0-9]+/users$", "/v"),
        (r"^/api/users", "/api/users"),
        (r"\A/api", "/api"),
        (r"^/file\.txt$", "/file.txt"),
        (r"^/ab?", "/a"),
        (r"^/ab*", "/a"),
        (r"^/ab+", "/ab"),
        (r"^/ab{0,2}", "/a"),
        (r"^/x\d+", "/x"),
        (r"users$", ""),
        (r"^/a|^/b", ""),
        (r"(?i)^/api", ""),
    ],
)
def test_regex_literal_prefix(pattern: str, literal: str) -> None:
    assert regex_literal_prefix(pattern) == literal


# --- hypothesis: laws and a brute-force reference ----------------------------

segment = st.sampled_from(["a", "b", "ab", "api", "v1", "x.y", "%2F", "~"])
segment_or_odd = st.one_of(segment, st.sampled_from(["", ".", "..", "%2f", "aX", "a;b"]))


@st.composite
def config_path(draw: st.DrawFn) -> str:
    segs = draw(st.lists(segment, min_size=0, max_size=3))
    if not segs:
        return "/"
    return "/" + "/".join(segs) + draw(st.sampled_from(["", "", "/"]))


@st.composite
def request_path(draw: st.DrawFn) -> str:
    segs = draw(st.lists(segment_or_odd, min_size=0, max_size=4))
    return "/" + "/".join(segs) + draw(st.sampled_from(["", "/"]))


@given(
    prefix=st.lists(segment, min_size=1, max_size=3).map(lambda s: "/" + "/".join(s)),
    suffix=st.text(alphabet="/aX%2F.", max_size=6),
)
@example(prefix="/api/users", suffix="X")
@example(prefix="/api/users", suffix="%2F7")
def test_law_segment_boundary(prefix: str, suffix: str) -> None:
    table = RouteTable([route(path=prefix)])
    expected = suffix == "" or suffix.startswith("/")
    assert (name_of(table, prefix + suffix) == "r0") is expected
    # The same prefix written with a trailing slash needs the slash.
    slashed = RouteTable([route(path=prefix + "/")])
    assert (name_of(slashed, prefix + suffix) == "r0") is suffix.startswith("/")


label = st.text(alphabet="abcxyz019-", min_size=1, max_size=6)


@given(
    labels=st.lists(label, min_size=1, max_size=3),
    base=st.lists(label, min_size=1, max_size=2).map(".".join),
    port=st.one_of(st.none(), st.integers(1, 65535)),
    upper=st.booleans(),
)
def test_law_wildcard_host(labels: list[str], base: str, port: int | None, upper: bool) -> None:
    table = RouteTable([route(host="*." + base, path="/")])

    def matches(host: str) -> bool:
        host = host.upper() if upper else host
        host = host if port is None else f"{host}:{port}"
        return name_of(table, "/", host=host) == "r0"

    assert matches(".".join(labels) + "." + base)
    assert not matches(base)
    assert not matches("".join(labels) + base)  # no dot: not a label boundary
    assert not matches(".".join(labels) + "." + base + "x")


def _ref_host_ok(configured: str | None, host: str | None) -> bool:
    if configured in (None, "", "*"):
        return True
    if not host:
        return False
    # An independent parse: urlsplit lower-cases and unbrackets the host.
    got = (urlsplit("//" + host).hostname or "").removesuffix(".")
    if configured.startswith("*."):
        suffix = configured[1:].lower()
        return got.endswith(suffix) and got != suffix[1:] and len(got) > len(suffix)
    want = urlsplit("//" + configured).hostname or ""
    return got == want


def _ref_path_ok(r: RouteConfig, path: str) -> bool:
    import re

    if r.path_regex is not None and re.search(r.path_regex, path) is None:
        return False
    p = r.path
    if p is None or p == "/":
        return True
    if p.endswith("/"):
        return path.startswith(p)
    return path == p or path.startswith(p + "/")


def _ref_methods(r: RouteConfig) -> set[str] | None:
    if r.methods is None:
        return None
    return set(r.methods) | ({"HEAD"} if "GET" in r.methods else set())


def _ref_key(r: RouteConfig) -> tuple[int, int, int, int]:
    if r.path is None and r.path_regex is not None:
        return (-r.priority, -len(regex_literal_prefix(r.path_regex)), 0, r.index)
    return (-r.priority, -(0 if r.path in (None, "/") else len(r.path or "")), 1, r.index)


def reference_match(
    routes: Sequence[RouteConfig],
    method: str,
    host: str | None,
    path: str,
    headers: CIMultiDictProxy[str],
) -> str | tuple[str, ...] | None:
    """Brute force: the winning route's name, the 405 Allow tuple, or None (404)."""
    applicable = [
        r
        for r in routes
        if _ref_host_ok(r.host, host)
        and _ref_path_ok(r, path)
        and all(v in headers.getall(n, []) for n, v in r.headers)
    ]
    admitted = [r for r in applicable if (m := _ref_methods(r)) is None or method in m]
    if admitted:
        return min(admitted, key=_ref_key).name
    if applicable:
        return tuple(sorted(set().union(*(_ref_methods(r) or set() for r in applicable))))
    return None


REGEXES = [r"^/a", r"^/a/b$", r"b$", r"^/v[0-9]+/", r"^/(a|b)/", r"^/api/\w+$", r"%2F"]
REGEX_HITS = ["/a/b", "/b/", "/v2/x", "/api/users", "/a%2Fb", "/ab"]
CONFIG_HOSTS = [None, "example.com", "*.example.com", "api.example.com", "[::1]", "*"]
REQUEST_HOSTS = [
    None,
    "example.com",
    "EXAMPLE.com:8080",
    "api.example.com",
    "a.b.example.com",
    "[::1]:8080",
    "[::1]",
    "other.org",
    "example.com.",
]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]


@st.composite
def route_list(draw: st.DrawFn) -> list[RouteConfig]:
    n = draw(st.integers(1, 8))
    out = []
    for i in range(n):
        use_regex = draw(st.booleans()) and draw(st.booleans())
        methods = draw(
            st.one_of(
                st.none(),
                st.lists(
                    st.sampled_from(["GET", "POST", "PUT", "DELETE"]), min_size=1, unique=True
                ).map(tuple),
            )
        )
        out.append(
            route(
                i,
                path=None if use_regex else draw(config_path()),
                path_regex=draw(st.sampled_from(REGEXES)) if use_regex else None,
                host=draw(st.one_of(st.none(), st.sampled_from(CONFIG_HOSTS))),
                methods=methods,
                headers=tuple(
                    draw(
                        st.one_of(
                            st.just([]),
                            st.lists(st.sampled_from([("x-a", "1"), ("x-b", "2")]), unique=True),
                        )
                    )
                ),
                # Mostly equal priorities, so the tie-breaks get exercised.
                priority=draw(st.sampled_from([0, 0, 0, 1, 2])),
            )
        )
    return out


@given(
    routes=route_list(),
    method=st.sampled_from(METHODS),
    host=st.sampled_from(REQUEST_HOSTS),
    data=st.data(),
    header_lines=st.lists(st.sampled_from([("X-A", "1"), ("x-a", "2"), ("X-B", "2")])),
)
def test_match_equals_brute_force_reference(
    routes: list[RouteConfig],
    method: str,
    host: str | None,
    data: st.DataObject,
    header_lines: list[tuple[str, str]],
) -> None:
    # Half the time, aim the request at one route's prefix so matches are common.
    path = data.draw(st.one_of(request_path(), st.sampled_from(REGEX_HITS)))
    aimed = data.draw(st.sampled_from(routes))
    if aimed.path is not None and data.draw(st.booleans()):
        path = aimed.path.rstrip("/") + data.draw(st.sampled_from(["", "/", "/x", "X", "/b/"]))
        path = path or "/"
    headers = hdrs(*header_lines)
    table = RouteTable(routes)

    expected = reference_match(routes, method, host, path, headers)
    try:
        got: str | tuple[str, ...] | None = table.match(method, host, path, headers).name
    except MethodNotAllowed as e:
        got = e.allowed
    except NoRoute:
        got = None
    assert got == expected


# --- forward_path ------------------------------------------------------------

STRIP = route(path="/api/users", strip_prefix=True)


@pytest.mark.parametrize(
    ("raw_path", "raw_query", "base", "expected"),
    [
        ("/api/users/7", None, "", "/7"),
        ("/api/users", None, "", "/"),
        ("/api/users/", None, "", "/"),
        ("/api/users/7", None, "/base", "/base/7"),
        ("/api/users/7", None, "/base/", "/base/7"),
        ("/api/users/7", None, "/", "/7"),
        ("/api/users", None, "/base", "/base/"),
        ("/api/users//7", None, "", "//7"),  # raw bytes: no slash merging
        ("/api/users/a%2Fb/../c", "x=%20", "", "/a%2Fb/../c?x=%20"),
        ("/api/users/7", "", "", "/7?"),  # an empty query is kept
        ("/api/users", "", "/b", "/b/?"),
    ],
)
def test_forward_path_strip_prefix(
    raw_path: str, raw_query: str | None, base: str, expected: str
) -> None:
    assert forward_path(STRIP, raw_path, raw_query, base) == expected


def test_forward_path_never_cuts_mid_segment() -> None:
    assert forward_path(STRIP, "/api/usersX", None, "") == "/api/usersX"


def test_forward_path_strip_prefix_with_trailing_slash_prefix() -> None:
    r = route(path="/api/", strip_prefix=True)
    assert forward_path(r, "/api/x", None, "") == "/x"
    assert forward_path(r, "/api/", None, "/b") == "/b/"


def test_forward_path_without_strip_keeps_the_path() -> None:
    r = route(path="/api/users")
    assert forward_path(r, "/api/users/7", None, "/base/") == "/base/api/users/7"
    regex = route(path_regex="^/api", strip_prefix=True)  # nothing to strip without `path`
    assert forward_path(regex, "/api/x", "q", "") == "/api/x?q"


raw_path_chars = st.sampled_from(
    ["/", "//", ".", "..", "%2F", "%2f", "%", "%zz", "a", "Z", "~", ";", "=", "&", "+", "%20", "é"]
)
raw_paths = st.lists(raw_path_chars, max_size=12).map(lambda parts: "/" + "".join(parts))


@given(
    raw_path=raw_paths,
    raw_query=st.one_of(st.none(), st.text(alphabet="a=&%2F?/ ", max_size=8)),
)
@example(raw_path="/a/../b/%2F/./c//", raw_query="")
@example(raw_path="/", raw_query=None)
def test_forward_path_is_byte_identical_without_strip_and_base(
    raw_path: str, raw_query: str | None
) -> None:
    r = route(path="/")
    expected = raw_path if raw_query is None else raw_path + "?" + raw_query
    assert forward_path(r, raw_path, raw_query, "") == expected


@given(
    prefix=st.lists(segment, min_size=1, max_size=3).map(lambda s: "/" + "/".join(s)),
    rest=st.one_of(st.just(""), raw_paths),
    base=st.sampled_from(["", "/", "/base", "/base/", "/a/b"]),
)
def test_forward_path_join_never_doubles_or_drops_a_slash(
    prefix: str, rest: str, base: str
) -> None:
    r = route(path=prefix, strip_prefix=True)
    out = forward_path(r, prefix + rest, None, base)
    assert out == base.removesuffix("/") + (rest or "/")
    assert out.startswith("/")


# --- dot-segments (CONTRACT.md "On the wire": refused with 400) --------------


def target_segments(raw_path: str, *, cut_fragment: bool = True) -> list[str]:
    """The segments a lenient target may see once it decodes the raw path:
    %2E as ".", %2F, %5C and "\\" as "/", a fragment cut off, ";params" dropped
    from each segment (Tomcat, Jetty)."""
    path = raw_path.split("#", 1)[0] if cut_fragment else raw_path.replace("#", "/")
    path = re.sub("%2[eE]", ".", path)
    path = re.sub(r"%2[fF]|%5[cC]|\\", "/", path)
    return [segment.split(";", 1)[0] for segment in path.split("/")]


def remove_dot_segments(segments: list[str]) -> list[str]:
    """RFC 3986 §5.2.4 over a list of segments (the first is the empty root)."""
    out: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    return ["", *out]


REFUSED_PATHS = [
    "/api/../internal/secret",
    "/api/%2e%2e/internal/secret",
    "/api/%2E%2E/x",
    "/api/%2e./x",
    "/api/.%2E/x",
    "/api/%2E%2e",
    "/api/..",
    "/api/.",
    "/api/x/..",
    "/api/./x",
    "/..",
    "/.",
    "/./",
    "/api//../x",
    "/api/..%2Fsecret",
    "/api/..%2finternal",
    "/api/x%2F..%2Fy",
    "/api/..;/internal",
    "/api/..;jsessionid=1/internal",
    "/api/.;x",
    "/api/..\\internal",
    "/api/..%5Cinternal",
    "/api/..%5cinternal",
    "/api\\..\\internal",
    "/api/..#",
    "/api/%2e%2e#x",
]
ACCEPTED_PATHS = [
    "/",
    "/api",
    "/api/",
    "/api/...",
    "/api/..../x",
    "/api/.hidden",
    "/api/a.b",
    "/api/..a",
    "/api/a..",
    "/api/.%2e.",
    "/api/%2e%2e%2e",
    "/api/v1.2/x.json",
    "/api/%252e%252e/x",  # an encoded "%": a dot only to a target decoding twice
    "/api/%2e%2ex",
    "/api/x%2E",
    "/api/%2f/x",
    "*",  # OPTIONS * has no path segments at all
    "",
]


@pytest.mark.parametrize("raw_path", REFUSED_PATHS)
def test_a_path_with_a_dot_segment_in_any_spelling_is_refused(raw_path: str) -> None:
    assert has_dot_segment(raw_path)


@pytest.mark.parametrize("raw_path", ACCEPTED_PATHS)
def test_names_that_merely_contain_dots_are_not_dot_segments(raw_path: str) -> None:
    assert not has_dot_segment(raw_path)


_PATH_PIECES = st.sampled_from(
    [
        *("/", "a", "b.c", ".", "..", "...", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\"),
        *(";", ";x", "#", "%25", "%252e", ".x", "x.", "%", "2e", "e"),
    ]
)
_RAW_PATHS = st.lists(_PATH_PIECES, max_size=12).map(lambda pieces: "/" + "".join(pieces))


@given(raw_path=_RAW_PATHS)
@example(raw_path="/api/../internal/secret")
@example(raw_path="/api/%2e%2e/internal/secret")
@example(raw_path="/api/..%2Fsecret")
@example(raw_path="/api/..;/internal")
@example(raw_path="/api/..#")
@example(raw_path="/%2%2e%2e/x")
def test_every_dot_segment_a_decoding_target_could_resolve_is_refused(raw_path: str) -> None:
    # Sound: whatever a lenient target decodes, a path it would resolve is refused.
    if any(segment in (".", "..") for segment in target_segments(raw_path)[1:]):
        assert has_dot_segment(raw_path)
    # Precise: refused only for a real dot-segment (under one of those readings).
    if has_dot_segment(raw_path):
        segments = target_segments(raw_path, cut_fragment=False)
        assert any(segment in (".", "..") for segment in segments[1:])


@given(rest=_RAW_PATHS)
@example(rest="/../internal")
@example(rest="/%2e%2e/internal")
@example(rest="/x/../../internal")
def test_a_prefix_confines_every_path_that_is_not_refused(rest: str) -> None:
    # The reason for the rule: a path the "/api" route admits and the gateway
    # forwards still starts with "/api" after the target removes dot-segments.
    raw_path = "/api" + rest
    if has_dot_segment(raw_path):
        return
    resolved = remove_dot_segments(target_segments(raw_path))
    assert resolved[:2] == ["", "api"]


# --- large tables: the indexed table against a plain linear scan --------------

BIG_PATHS = ["/", "/a", "/a/", "/a/b", "/api", "/api/users", "/api/users/", "/v1", "/x/y/z"]
BIG_REGEXES = [
    *REGEXES,
    r"^/api/users/[0-9]+$",
    r"^/api/v[0-9]+",
    r"^/x/y/",
    r"^/a/b",
    r"^/re1/[0-9]+$",
    r"^/a\.b/",
]
BIG_HOSTS = [*CONFIG_HOSTS, "*.b.example.com", "other.org", "a.b.example.com"]
BIG_REQUEST_PATHS = [
    "/",
    "/a",
    "/a/b",
    "/a/b/c",
    "/api/users/7",
    "/api/users/x",
    "/api/v2/z",
    "/x/y/z",
    "/x/y",
    "/re1/12",
    "/a.b/c",
    "/v1/q",
    "/ab",
    "/api/usersX",
]
BIG_REQUEST_HOSTS = [*REQUEST_HOSTS, "x.b.example.com", "a.b.example.com", "OTHER.org:1"]


@st.composite
def big_route_list(draw: st.DrawFn) -> list[RouteConfig]:
    out = []
    for i in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(["path", "path", "regex"]))
        out.append(
            route(
                i,
                path=draw(st.sampled_from(BIG_PATHS)) if kind == "path" else None,
                path_regex=draw(st.sampled_from(BIG_REGEXES)) if kind == "regex" else None,
                host=draw(st.one_of(st.none(), st.sampled_from(BIG_HOSTS))),
                methods=draw(
                    st.one_of(
                        st.none(),
                        st.lists(
                            st.sampled_from(["GET", "POST", "PUT"]), min_size=1, unique=True
                        ).map(tuple),
                    )
                ),
                headers=tuple(
                    draw(st.lists(st.sampled_from([("x-a", "1"), ("x-b", "2")]), unique=True))
                ),
                priority=draw(st.sampled_from([0, 0, 0, 1, 2])),
            )
        )
    return out


@given(
    routes=big_route_list(),
    requests=st.lists(
        st.tuples(
            st.sampled_from(METHODS),
            st.sampled_from(BIG_REQUEST_HOSTS),
            st.sampled_from(BIG_REQUEST_PATHS),
            st.lists(st.sampled_from([("X-A", "1"), ("X-B", "2")]), max_size=2),
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_large_table_equals_linear_scan_in_precedence_order(
    routes: list[RouteConfig],
    requests: list[tuple[str, str | None, str, list[tuple[str, str]]]],
) -> None:
    table = RouteTable(routes)
    for method, host, path, header_lines in requests:
        headers = hdrs(*header_lines)
        expected = reference_match(routes, method, host, path, headers)
        try:
            got: str | tuple[str, ...] | None = table.match(method, host, path, headers).name
        except MethodNotAllowed as e:
            got = e.allowed
        except NoRoute:
            got = None
        assert got == expected, (method, host, path, header_lines)


def test_twelve_thousand_routes_each_reach_their_own_route() -> None:
    routes = [route(i, path=f"/svc{i}", strip_prefix=True) for i in range(10_000)]
    routes += [
        route(10_000 + i, name=f"h{i}", host=f"h{i}.example.com", path="/") for i in range(1000)
    ]
    routes += [route(11_000 + i, name=f"re{i}", path_regex=f"^/re{i}/[0-9]+$") for i in range(1000)]
    table = RouteTable(routes)
    for i in (0, 4321, 9999):
        assert name_of(table, f"/svc{i}/x") == f"r{i}"
    assert name_of(table, "/elsewhere", host="h7.example.com") == "h7"
    assert name_of(table, "/re999/12") == "re999"
    assert name_of(table, "/re999/x") is None


# --- shadowed routes (gateway check warnings) -----------------------------------


def test_shadowed_routes_reports_duplicates_and_covering_routes() -> None:
    routes = [
        route(0, path="/api"),
        route(1, path="/api"),  # duplicate of 0
        route(2, path="/api/v1", methods=("GET",)),  # longer: comes before 0, fine
        route(3, path="/", host="*.example.com", priority=5),
        route(4, path_regex=r"^/x/[0-9]+$", host="a.example.com"),  # under 3
        route(5, path_regex=r"^/x/[0-9]+$", host="other.org"),
        route(6, path="/api", headers=(("x-a", "1"),)),  # 0 comes first and needs less
        route(7, path="/api", methods=("POST",), priority=1),  # ranks before 0: fine
    ]
    found = {(shadowed.name, winner.name) for shadowed, winner in shadowed_routes(routes)}
    assert found == {("r1", "r0"), ("r4", "r3"), ("r6", "r0")}


@given(routes=big_route_list(), requests=st.data())
def test_law_a_route_reported_shadowed_never_matches(
    routes: list[RouteConfig], requests: st.DataObject
) -> None:
    shadowed = {r.name for r, _ in shadowed_routes(routes)}
    table = RouteTable(routes)
    for _ in range(10):
        method = requests.draw(st.sampled_from(METHODS))
        host = requests.draw(st.sampled_from(BIG_REQUEST_HOSTS))
        path = requests.draw(st.sampled_from(BIG_REQUEST_PATHS))
        headers = hdrs(*requests.draw(st.lists(st.sampled_from([("X-A", "1"), ("X-B", "2")]))))
        with contextlib.suppress(NoRoute, MethodNotAllowed):
            assert table.match(method, host, path, headers).name not in shadowed
