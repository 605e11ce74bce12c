"""CORS policy: the Fetch standard's CORS protocol rules, one test per rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.core.config import CorsConfig, parse
from gateway.core.cors import PREFLIGHT_STATUS, CorsPolicy, is_preflight, merge_headers

APP = "https://app.example.com"
EVIL = "https://evil.example.net"
PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
SAFELISTED = "Accept, Accept-Language, Content-Language, Content-Type"


def policy(**fields: object) -> CorsPolicy:
    return CorsPolicy(CorsConfig(**fields))  # type: ignore[arg-type]


def listed(**fields: object) -> CorsPolicy:
    """A policy for APP only, PUT/DELETE allowed on top of the safelisted methods."""
    fields.setdefault("allow_origins", (APP,))
    fields.setdefault("allow_methods", ("GET", "PUT", "DELETE"))
    return policy(**fields)


def request(**headers: str) -> CIMultiDict[str]:
    """Request headers; keyword `Access_Control_Request_Method` -> the dashed name."""
    return CIMultiDict((name.replace("_", "-"), value) for name, value in headers.items())


def ask(
    origin: str | None = APP, method: str = "PUT", req_headers: str | None = None
) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    if origin is not None:
        headers["Origin"] = origin
    headers["Access-Control-Request-Method"] = method
    if req_headers is not None:
        headers["Access-Control-Request-Headers"] = req_headers
    return headers


def as_dict(pairs: list[tuple[str, str]]) -> dict[str, str]:
    names = [name.lower() for name, _ in pairs]
    assert len(names) == len(set(names)), f"repeated header in {pairs}"
    return {name: value for name, value in pairs}


def allowed(result: tuple[int, list[tuple[str, str]]]) -> dict[str, str]:
    status, headers = result
    assert status == PREFLIGHT_STATUS == 204
    answer = as_dict(headers)
    assert "Access-Control-Allow-Origin" in answer, headers
    assert answer["Vary"] == PREFLIGHT_VARY
    return answer


def refused(result: tuple[int, list[tuple[str, str]]]) -> None:
    # 204 like an allowed one, only the Vary line: the browser's CORS check fails.
    assert result == (204, [("Vary", PREFLIGHT_VARY)])


# -- is_preflight ------------------------------------------------------------


def test_preflight_is_options_with_origin_and_request_method() -> None:
    assert is_preflight("OPTIONS", ask())


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("GET", ask()),  # not OPTIONS
        ("options", ask()),  # methods are case-sensitive; browsers send OPTIONS
        ("OPTIONS", ask(origin=None)),  # no Origin: not a CORS request
        ("OPTIONS", request(Origin=APP)),  # a plain OPTIONS, forwarded like any request
    ],
)
def test_anything_else_is_not_a_preflight(method: str, headers: CIMultiDict[str]) -> None:
    assert not is_preflight(method, headers)


def test_preflight_header_names_ignore_case() -> None:
    headers = CIMultiDict({"origin": APP, "ACCESS-CONTROL-REQUEST-METHOD": "PUT"})
    assert is_preflight("OPTIONS", headers)


# -- preflight: origins --------------------------------------------------------


def test_allowed_origin_is_echoed_with_methods_headers_and_vary() -> None:
    answer = allowed(listed().preflight(ask()))
    assert answer == {
        "Access-Control-Allow-Origin": APP,
        "Access-Control-Allow-Methods": "GET, PUT, DELETE",
        "Access-Control-Allow-Headers": SAFELISTED,
        "Vary": PREFLIGHT_VARY,
    }


def test_disallowed_origin_gets_204_without_allow_headers() -> None:
    refused(listed().preflight(ask(origin=EVIL)))


def test_null_origin_is_refused_by_a_list() -> None:
    refused(listed().preflight(ask(origin="null")))


def test_origin_compares_ignoring_case_and_default_port_but_is_echoed_verbatim() -> None:
    cors = listed(allow_origins=("https://App.Example.com:443", "http://localhost:8080"))
    assert allowed(cors.preflight(ask(origin=APP)))["Access-Control-Allow-Origin"] == APP
    odd = "HTTPS://APP.example.COM"
    assert allowed(cors.preflight(ask(origin=odd)))["Access-Control-Allow-Origin"] == odd
    assert allowed(cors.preflight(ask(origin="http://localhost:8080")))
    refused(cors.preflight(ask(origin="http://localhost")))
    refused(cors.preflight(ask(origin="http://localhost:80")))
    refused(cors.preflight(ask(origin="http://app.example.com")))  # scheme is part of it


def test_wildcard_origin_without_credentials_says_star() -> None:
    answer = allowed(policy(allow_methods=("PUT",)).preflight(ask(origin=EVIL)))
    assert answer["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in answer
    # Opaque origins ("null") may read non-credentialed responses too.
    assert allowed(policy().preflight(ask(origin="null", method="GET")))


def test_wildcard_origin_with_credentials_echoes_the_origin() -> None:
    # config.py refuses this pair; a hand-built config must still never send
    # `*` with credentials (Fetch §3.3.5), so the origin is echoed.
    cors = policy(allow_credentials=True, allow_methods=("PUT",))
    answer = allowed(cors.preflight(ask(origin=EVIL)))
    assert answer["Access-Control-Allow-Origin"] == EVIL
    assert answer["Access-Control-Allow-Credentials"] == "true"


@pytest.mark.parametrize("origin", ["null", "", "https://a.example, https://b.example", "a b"])
def test_wildcard_with_credentials_never_echoes_a_non_origin(origin: str) -> None:
    cors = policy(allow_credentials=True)
    refused(cors.preflight(ask(origin=origin, method="GET")))
    assert cors.response_headers(request(Origin=origin)) == [("Vary", "Origin")]


def test_credentials_add_allow_credentials_true() -> None:
    answer = allowed(listed(allow_credentials=True).preflight(ask()))
    assert answer["Access-Control-Allow-Credentials"] == "true"
    assert answer["Access-Control-Allow-Origin"] == APP


def test_origin_list_with_star_allows_any_origin() -> None:
    cors = listed(allow_origins=(APP, "*"))
    assert allowed(cors.preflight(ask(origin=EVIL)))["Access-Control-Allow-Origin"] == "*"


# -- preflight: methods --------------------------------------------------------


def test_method_not_allowed_is_refused() -> None:
    refused(listed().preflight(ask(method="PATCH")))


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_safelisted_methods_are_always_allowed(method: str) -> None:
    cors = listed(allow_methods=("PUT",), allow_headers=("X-Token",))
    answer = allowed(cors.preflight(ask(method=method, req_headers="x-token")))
    assert answer["Access-Control-Allow-Methods"] == "PUT"


def test_empty_method_list_sends_no_allow_methods_and_admits_safelisted_only() -> None:
    # Fetch §4.8: without Access-Control-Allow-Methods only safelisted methods pass.
    cors = listed(allow_methods=(), allow_headers=("X-Token",))
    answer = allowed(cors.preflight(ask(method="POST", req_headers="x-token")))
    assert "Access-Control-Allow-Methods" not in answer
    refused(cors.preflight(ask(method="PUT")))


def test_methods_compare_case_sensitively_after_browser_normalization() -> None:
    cors = listed(allow_methods=("PUT", "PATCH"))
    # Browsers upper-case only DELETE GET HEAD OPTIONS POST PUT (Fetch §2.2.1),
    # so a page's fetch(..., {method: "patch"}) really sends `patch`.
    refused(cors.preflight(ask(method="patch")))
    assert allowed(cors.preflight(ask(method="PATCH")))
    assert allowed(cors.preflight(ask(method="put")))
    assert allowed(cors.preflight(ask(method=" PUT ")))


@pytest.mark.parametrize("method", ["", "P UT", "PUT,DELETE", "{}"])
def test_a_requested_method_that_is_no_token_is_refused(method: str) -> None:
    refused(listed(allow_methods=("*",)).preflight(ask(method=method)))


def test_wildcard_methods_without_credentials_say_star() -> None:
    answer = allowed(listed(allow_methods=("*",)).preflight(ask(method="PURGE")))
    assert answer["Access-Control-Allow-Methods"] == "*"


def test_wildcard_methods_with_credentials_name_the_requested_method() -> None:
    cors = listed(allow_methods=("*", "PUT"), allow_credentials=True)
    answer = allowed(cors.preflight(ask(method="PURGE")))
    assert answer["Access-Control-Allow-Methods"] == "PUT, PURGE"
    answer = allowed(cors.preflight(ask(method="PUT")))
    assert answer["Access-Control-Allow-Methods"] == "PUT"


# -- preflight: headers --------------------------------------------------------


def test_requested_header_not_allowed_is_refused() -> None:
    cors = listed(allow_headers=("X-Token",))
    refused(cors.preflight(ask(req_headers="x-token,x-other")))


def test_allowed_headers_are_the_configured_list_plus_safelisted_names() -> None:
    cors = listed(allow_headers=("X-Token", "x-token", "Content-Type", "X-Trace"))
    answer = allowed(cors.preflight(ask(req_headers="content-type,x-token")))
    assert answer["Access-Control-Allow-Headers"] == (
        "X-Token, Content-Type, X-Trace, Accept, Accept-Language, Content-Language"
    )


def test_header_names_compare_ignoring_case_and_whitespace() -> None:
    cors = listed(allow_headers=("X-Token", "authorization"))
    answer = allowed(cors.preflight(ask(req_headers=" X-TOKEN ,\tAuthorization,, ")))
    assert answer["Access-Control-Allow-Headers"].startswith("X-Token, authorization")


def test_safelisted_header_names_are_always_allowed() -> None:
    # A browser asks for content-type only when its value is outside the
    # safelist (application/json); a JSON API should not have to list it.
    answer = allowed(listed().preflight(ask(req_headers="accept,content-type")))
    assert answer["Access-Control-Allow-Headers"] == SAFELISTED


def test_wildcard_headers_without_credentials_say_star_but_not_for_authorization() -> None:
    cors = listed(allow_headers=("*",))
    answer = allowed(cors.preflight(ask(req_headers="x-anything,content-type")))
    assert answer["Access-Control-Allow-Headers"] == "*"
    # Fetch §2.2.2: Authorization is a CORS non-wildcard request-header name.
    refused(cors.preflight(ask(req_headers="authorization")))


def test_wildcard_headers_with_authorization_listed() -> None:
    cors = listed(allow_headers=("*", "Authorization"))
    answer = allowed(cors.preflight(ask(req_headers="authorization,x-anything")))
    assert answer["Access-Control-Allow-Headers"] == "*, Authorization"


def test_wildcard_headers_with_credentials_echo_the_requested_names() -> None:
    cors = listed(allow_headers=("*",), allow_credentials=True)
    answer = allowed(cors.preflight(ask(req_headers="x-b,content-type,x-a")))
    assert answer["Access-Control-Allow-Headers"] == SAFELISTED + ", x-b, x-a"
    refused(cors.preflight(ask(req_headers="authorization")))


@pytest.mark.parametrize("names", ["x a", "x-token,(bad)", "x:y"])
def test_a_requested_header_that_is_no_token_is_refused(names: str) -> None:
    cors = listed(allow_headers=("*",), allow_credentials=True)
    refused(cors.preflight(ask(req_headers=names)))


def test_no_requested_headers_still_lists_the_allowed_ones() -> None:
    # The browser caches every listed name (Fetch §4.9), not just those asked for.
    answer = allowed(listed(allow_headers=("X-Token",)).preflight(ask()))
    assert answer["Access-Control-Allow-Headers"] == "X-Token, " + SAFELISTED


# -- preflight: max age ------------------------------------------------------


def test_max_age_absent_sends_no_header() -> None:
    assert "Access-Control-Max-Age" not in allowed(listed().preflight(ask()))


@pytest.mark.parametrize(("max_age", "sent"), [(600.0, "600"), (0.0, "0"), (86399.9, "86399")])
def test_max_age_is_whole_seconds_rounded_down(max_age: float, sent: str) -> None:
    answer = allowed(listed(max_age=max_age).preflight(ask()))
    assert answer["Access-Control-Max-Age"] == sent


def test_refused_preflight_carries_no_max_age_or_credentials() -> None:
    refused(listed(max_age=600.0, allow_credentials=True).preflight(ask(origin=EVIL)))


# -- actual responses --------------------------------------------------------


def test_actual_response_for_an_allowed_origin() -> None:
    assert listed().response_headers(request(Origin=APP)) == [
        ("Access-Control-Allow-Origin", APP),
        ("Vary", "Origin"),
    ]


def test_actual_response_with_credentials_and_expose_headers() -> None:
    cors = listed(allow_credentials=True, expose_headers=("X-Request-ID", "RateLimit"))
    assert cors.response_headers(request(Origin=APP)) == [
        ("Access-Control-Allow-Origin", APP),
        ("Access-Control-Allow-Credentials", "true"),
        ("Access-Control-Expose-Headers", "X-Request-ID, RateLimit"),
        ("Vary", "Origin"),
    ]


def test_expose_star_is_dropped_with_credentials() -> None:
    # Fetch §3.3.5: with credentials `*` would name a header called "*".
    cors = listed(allow_credentials=True, expose_headers=("*", "X-Request-ID"))
    headers = as_dict(cors.response_headers(request(Origin=APP)))
    assert headers["Access-Control-Expose-Headers"] == "X-Request-ID"
    headers = as_dict(listed(expose_headers=("*",)).response_headers(request(Origin=APP)))
    assert headers["Access-Control-Expose-Headers"] == "*"


def test_actual_response_for_a_disallowed_origin_only_varies() -> None:
    cors = listed(allow_credentials=True, expose_headers=("X-Request-ID",))
    assert cors.response_headers(request(Origin=EVIL)) == [("Vary", "Origin")]


def test_actual_response_without_origin_still_varies_on_origin() -> None:
    # Fetch "CORS protocol and HTTP caches": else a cache serves this
    # header-less answer to a later CORS request from an allowed origin.
    assert listed().response_headers(request()) == [("Vary", "Origin")]


def test_wildcard_without_credentials_is_static_star_and_never_varies() -> None:
    cors = policy(expose_headers=("X-Request-ID",))
    expected = [
        ("Access-Control-Allow-Origin", "*"),
        ("Access-Control-Expose-Headers", "X-Request-ID"),
    ]
    # Same answer with or without Origin (Fetch: send `*` on every response, no Vary).
    assert cors.response_headers(request(Origin=EVIL)) == expected
    assert cors.response_headers(request(Origin="null")) == expected
    assert cors.response_headers(request()) == expected


def test_wildcard_with_credentials_echoes_and_varies() -> None:
    cors = policy(allow_credentials=True)
    assert cors.response_headers(request(Origin=EVIL)) == [
        ("Access-Control-Allow-Origin", EVIL),
        ("Access-Control-Allow-Credentials", "true"),
        ("Vary", "Origin"),
    ]


def test_response_headers_ignore_the_method_policy() -> None:
    # An actual request reached us; whether its method was allowed was the
    # preflight's question. The response answers only "may this origin read it".
    cors = listed(allow_methods=())
    assert as_dict(cors.response_headers(request(Origin=APP)))["Access-Control-Allow-Origin"]


# -- merging into a proxied response -----------------------------------------


def test_merge_drops_the_targets_access_control_headers() -> None:
    target = CIMultiDict(
        [
            ("Content-Type", "application/json"),
            ("Access-Control-Allow-Origin", "*"),
            ("access-control-allow-origin", EVIL),
            ("Access-Control-Allow-Credentials", "true"),
            ("Access-Control-Expose-Headers", "X-Secret"),
        ]
    )
    merge_headers(target, listed().response_headers(request(Origin=APP)))
    assert list(target.items()) == [
        ("Content-Type", "application/json"),
        ("Access-Control-Allow-Origin", APP),
        ("Vary", "Origin"),
    ]


def test_merge_drops_target_headers_even_when_the_origin_is_refused() -> None:
    target = CIMultiDict([("Access-Control-Allow-Origin", EVIL)])
    merge_headers(target, listed().response_headers(request(Origin=EVIL)))
    assert list(target.items()) == [("Vary", "Origin")]


@pytest.mark.parametrize(
    ("vary", "merged"),
    [
        ([], "Origin"),
        (["Accept-Encoding"], "Accept-Encoding, Origin"),
        (["Accept-Encoding, origin"], "Accept-Encoding, origin"),
        (["Accept-Encoding", "Accept-Language"], "Accept-Encoding, Accept-Language, Origin"),
        ([" , Cookie ,"], "Cookie, Origin"),
        (["*"], "*"),
        (["Accept, *"], "Accept, *"),
    ],
)
def test_merge_adds_to_the_targets_vary(vary: list[str], merged: str) -> None:
    target: CIMultiDict[str] = CIMultiDict(("Vary", value) for value in vary)
    merge_headers(target, listed().response_headers(request(Origin=APP)))
    assert target.getall("Vary") == [merged]


def test_merge_of_a_static_star_policy_adds_no_vary() -> None:
    target = CIMultiDict([("Vary", "Accept-Encoding")])
    merge_headers(target, policy().response_headers(request(Origin=APP)))
    assert target.getall("Vary") == ["Accept-Encoding"]
    assert target["Access-Control-Allow-Origin"] == "*"


# -- from routes.toml, and properties ----------------------------------------


def test_policy_from_a_parsed_route() -> None:
    config = parse(
        """
        [upstreams.api]
        targets = ["http://127.0.0.1:9001"]

        [[routes]]
        name = "api"
        path = "/api"
        upstream = "api"

        [routes.cors]
        allow_origins = ["https://App.example.com"]
        allow_methods = ["get", "patch"]
        allow_headers = ["X-Token"]
        expose_headers = ["X-Request-ID"]
        allow_credentials = true
        max_age = 600
        """
    )
    cors_config = config.routes[0].cors
    assert cors_config is not None
    cors = CorsPolicy(cors_config)
    answer = allowed(cors.preflight(ask(method="PATCH", req_headers="x-token")))
    assert answer == {
        "Access-Control-Allow-Origin": APP,
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Allow-Methods": "GET, PATCH",
        "Access-Control-Allow-Headers": "X-Token, " + SAFELISTED,
        "Access-Control-Max-Age": "600",
        "Vary": PREFLIGHT_VARY,
    }
    assert as_dict(cors.response_headers(request(Origin=APP))) == {
        "Access-Control-Allow-Origin": APP,
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Expose-Headers": "X-Request-ID",
        "Vary": "Origin",
    }


ORIGINS = st.sampled_from([APP, EVIL, "null", "http://localhost:8080", "HTTPS://APP.EXAMPLE.COM"])
CONFIGS = st.builds(
    CorsConfig,
    allow_origins=st.sampled_from([("*",), (APP,), (APP, "http://localhost:8080")]),
    allow_methods=st.sampled_from([(), ("PUT",), ("*",), ("GET", "DELETE")]),
    allow_headers=st.sampled_from([(), ("X-Token",), ("*",), ("*", "Authorization")]),
    expose_headers=st.sampled_from([(), ("X-Request-ID",), ("*",)]),
    allow_credentials=st.booleans(),
    max_age=st.sampled_from([None, 0.0, 600.0]),
)


@given(
    config=CONFIGS,
    origin=ORIGINS,
    method=st.sampled_from(["GET", "PUT", "patch", "DELETE", "PURGE"]),
    names=st.lists(st.sampled_from(["x-token", "authorization", "content-type", "x-other"])),
)
def test_preflight_never_sends_star_with_credentials(
    config: CorsConfig, origin: str, method: str, names: list[str]
) -> None:
    status, headers = CorsPolicy(config).preflight(ask(origin, method, ",".join(names)))
    assert status == 204
    answer = as_dict(headers)
    assert answer["Vary"] == PREFLIGHT_VARY
    if "Access-Control-Allow-Origin" not in answer:
        assert list(answer) == ["Vary"]
        return
    if config.allow_credentials:
        # Fetch §3.3.5: every `*` would be read literally.
        assert answer["Access-Control-Allow-Origin"] == origin
        assert answer["Access-Control-Allow-Credentials"] == "true"
        assert answer.get("Access-Control-Allow-Methods") != "*"
        assert "*" not in answer["Access-Control-Allow-Headers"].split(", ")
    # What the browser will check (Fetch §4.8) passes whenever headers are sent.
    wire_methods = answer.get("Access-Control-Allow-Methods", "").split(", ")
    normalized = method.upper() if method.upper() != "PATCH" else method
    assert (
        normalized in ("GET", "HEAD", "POST")
        or normalized in wire_methods
        or ("*" in wire_methods and not config.allow_credentials)
    )
    wire_headers = {name.lower() for name in answer["Access-Control-Allow-Headers"].split(", ")}
    for name in names:
        assert name in wire_headers or (
            "*" in wire_headers and name != "authorization" and not config.allow_credentials
        )


@given(config=CONFIGS, origin=st.one_of(st.none(), ORIGINS))
def test_response_headers_vary_unless_static_star(config: CorsConfig, origin: str | None) -> None:
    headers = request() if origin is None else request(Origin=origin)
    answer = as_dict(CorsPolicy(config).response_headers(headers))
    static_star = config.allow_origins == ("*",) and not config.allow_credentials
    assert ("Vary" in answer) is not static_star
    if static_star:
        assert answer["Access-Control-Allow-Origin"] == "*"
    elif "Access-Control-Allow-Origin" in answer:
        assert answer["Access-Control-Allow-Origin"] == origin
    else:
        assert answer == {"Vary": "Origin"}
