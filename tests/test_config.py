"""routes.toml loading: the resolved Structs and every error naming its key path."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.config import (
    Config,
    ConfigError,
    HealthConfig,
    TargetConfig,
    load,
    parse,
    parse_listen_address,
    summary,
)

# A copy of the shipped routes.toml, its fuller example uncommented: the shipped file
# is the operator's to edit, so only tests/test_ops_cli.py checks that it passes.
EXAMPLE = Path(__file__).resolve().parent / "data" / "routes.toml"

UPSTREAM = """
[upstreams.users]
targets = ["http://127.0.0.1:9001"]
"""


def doc(route: str = "", *, upstream: str = UPSTREAM, top: str = "") -> str:
    """A valid file (one upstream, one route "r") with extra lines in each place.

    `route` lands inside the route table, so it may end with route sub-tables.
    """
    return f'{top}\n{upstream}\n[[routes]]\nname = "r"\npath = "/"\nupstream = "users"\n{route}\n'


LINE = re.compile(r" \(line [0-9]+\)(?=;|$)")


def located(text: str) -> list[str]:
    """The errors exactly as `gateway check` prints them, line numbers included."""
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def errors(text: str) -> list[str]:
    """The errors without their ` (line N)`: most tests are about the message."""
    return [LINE.sub("", error, count=1) for error in located(text)]


# -- valid files --------------------------------------------------------------


def test_the_example_file_parses() -> None:
    config = load(str(EXAMPLE))
    assert config.server.listen == ("127.0.0.1:8080",)
    assert config.server.admin == "127.0.0.1:9901"
    assert config.server.access_log == "json"
    admin = config.upstreams["admin"]
    assert admin.targets == (TargetConfig(url="http://127.0.0.1:9901", weight=1),)
    assert admin.health is not None
    assert admin.health.path == "/healthz"
    route = config.routes[0]
    assert (route.name, route.path, route.upstream) == ("admin-api", "/", "admin")


def test_the_fuller_example_resolves_weights_limits_and_cors() -> None:
    config = load(str(EXAMPLE))
    assert config.upstreams["users"].targets[1] == TargetConfig(
        url="http://127.0.0.1:9002", weight=3
    )
    users = config.routes[1]
    assert users.rate_limit is not None
    assert users.rate_limit.key == "client_ip"
    assert users.cors is not None
    assert users.cors.allow_credentials is True


def test_empty_file_is_a_valid_config_with_defaults() -> None:
    config = parse("")
    assert config.server.listen == ("127.0.0.1:8080",)
    assert config.upstreams == {}
    assert config.routes == ()
    assert config.path == "<string>"


def test_defaults_fold_into_routes_and_a_route_override_wins() -> None:
    config = parse(
        UPSTREAM
        + """
[defaults]
connect_timeout = 1.5
read_timeout = 10
retries = 2

[[routes]]
name = "inherits"
path = "/a"
upstream = "users"

[[routes]]
name = "overrides"
path = "/b"
upstream = "users"
read_timeout = 300.0
retries = 0
max_body_bytes = 1024
"""
    )
    inherits, overrides = config.routes
    assert (inherits.connect_timeout, inherits.read_timeout) == (1.5, 10.0)
    assert (inherits.retries, inherits.max_body_bytes) == (2, 0)
    assert (overrides.connect_timeout, overrides.read_timeout) == (1.5, 300.0)
    assert (overrides.retries, overrides.max_body_bytes) == (0, 1024)


def test_route_without_defaults_table_gets_builtin_defaults() -> None:
    [route] = parse(doc()).routes
    assert (route.connect_timeout, route.read_timeout) == (5.0, 60.0)
    assert (route.max_body_bytes, route.retries) == (0, 0)
    assert (route.strip_prefix, route.preserve_host, route.priority) == (False, True, 0)
    assert route.rate_limit is None
    assert route.cors is None


def test_normalisation_of_methods_headers_host_and_index() -> None:
    config = parse(
        """
[upstreams.users]
balancer = "weighted"
targets = ["HTTP://127.0.0.1:9001/base/", { url = "http://127.0.0.1:9002", weight = 3 }]

[[routes]]
name = "first"
path = "/a"
upstream = "users"

[[routes]]
name = "second"
path = "/b"
host = "API.Example.COM"
methods = ["post", "GET", "Post"]
headers = { X-Canary = "1", "x-Tenant" = "Acme" }
upstream = "users"
"""
    )
    first, second = config.routes
    assert (first.index, second.index) == (0, 1)
    assert first.methods is None
    assert second.methods == ("POST", "GET")
    assert second.headers == (("x-canary", "1"), ("x-tenant", "Acme"))
    assert second.host == "api.example.com"
    # the URL is the target's identity and metric label: kept exactly as written
    assert config.upstreams["users"].targets == (
        TargetConfig(url="HTTP://127.0.0.1:9001/base/", weight=1),
        TargetConfig(url="http://127.0.0.1:9002", weight=3),
    )
    assert config.upstreams["users"].name == "users"


def test_sequences_are_tuples() -> None:
    config = parse(doc(top='[server]\nlisten = ["127.0.0.1:1", "unix:/tmp/gw.sock"]'))
    assert config.server.listen == ("127.0.0.1:1", "unix:/tmp/gw.sock")
    assert isinstance(config.server.trusted_proxies, tuple)
    assert isinstance(config.upstreams["users"].targets, tuple)


def test_health_table_present_turns_active_checks_on_with_defaults() -> None:
    config = parse(UPSTREAM + "[upstreams.users.health]\n")
    assert config.upstreams["users"].health == HealthConfig()
    assert parse(UPSTREAM).upstreams["users"].health is None


def test_unused_upstream_and_no_routes_are_fine() -> None:
    config = parse(UPSTREAM)
    assert config.routes == ()
    assert list(config.upstreams) == ["users"]


@pytest.mark.parametrize(
    "route",
    [
        'host = "*.example.com"',
        'host = "[::1]"',
        'methods = ["PURGE", "M-SEARCH"]',
        "[routes.rate_limit]\nrate = 0.5\nburst = 1\nkey = 'header:X-Api-Key'",
        "[routes.rate_limit]\nrate = 10\nburst = 20\nkey = 'route'",
        "[routes.cors]",
        "[routes.cors]\nallow_origins = ['https://a.example', 'http://localhost:3000']\n"
        "allow_credentials = true\nallow_headers = ['*']\nmax_age = 0",
    ],
)
def test_valid_route_options_are_accepted(route: str) -> None:
    parse(doc(route))


def test_regex_route_keeps_its_pattern() -> None:
    text = UPSTREAM + '[[routes]]\nname = "r"\npath_regex = "^/v[0-9]+/users$"\nupstream = "users"'
    [route] = parse(text).routes
    assert (route.path, route.path_regex) == (None, "^/v[0-9]+/users$")


# -- one error each, with its exact key path ----------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            UPSTREAM + '[[routes]]\nname = "a"\npath = "/a"\nupstream = "users"\n'
            '[[routes]]\nname = "b"\npath = "/b"\nupstream = "users"\n'
            '[[routes]]\nname = "users-api"\npath = "/"\nupstream = "userz"\n',
            'routes[2] ("users-api").upstream: unknown upstream "userz"; did you mean "users"?',
            id="unknown-upstream",
        ),
        pytest.param(
            '[upstreams.users]\ntargets = ["http://a:1", { url = "http://b:1", weight = 0 }]',
            "upstreams.users.targets[1].weight: must be > 0",
            id="weight-zero",
        ),
        pytest.param(
            '[server]\nlistne = ["127.0.0.1:8080"]',
            'server.listne: unknown key; did you mean "listen"?',
            id="server-unknown-key",
        ),
        pytest.param(
            doc() + '[[routes]]\nname = "r"\npath = "/x"\nupstream = "users"\n',
            'routes[1] ("r").name: duplicate route name "r" (also routes[0])',
            id="duplicate-route-name",
        ),
        pytest.param(
            UPSTREAM + '[[routes]]\npath = "/"\nupstream = "users"',
            "routes[0].name: required",
            id="route-name-missing",
        ),
        pytest.param(
            UPSTREAM + '[[routes]]\nname = ""\npath = "/"\nupstream = "users"',
            "routes[0].name: must not be empty",
            id="route-name-empty",
        ),
        pytest.param(
            UPSTREAM + '[[routes]]\nname = "r"\nupstream = "users"',
            'routes[0] ("r").path: required (or path_regex)',
            id="no-path",
        ),
        pytest.param(
            doc('path_regex = "^/x$"'),
            'routes[0] ("r").path_regex: cannot be set together with path',
            id="path-and-regex",
        ),
        pytest.param(
            UPSTREAM + '[[routes]]\nname = "r"\npath = "api"\nupstream = "users"',
            'routes[0] ("r").path: must start with "/"',
            id="path-without-slash",
        ),
        pytest.param(
            UPSTREAM + '[[routes]]\nname = "r"\npath_regex = "(a"\nupstream = "users"',
            'routes[0] ("r").path_regex: invalid regex: '
            "missing ), unterminated subpattern at position 0",
            id="bad-regex",
        ),
        pytest.param(
            UPSTREAM + '[[routes]]\nname = "r"\npath = "/"',
            'routes[0] ("r").upstream: required',
            id="upstream-missing",
        ),
        pytest.param(
            '[server]\ntrusted_proxies = ["10.0.0.0/8", "10.0.0.0/33"]',
            "server.trusted_proxies[1]: "
            "'10.0.0.0/33' does not appear to be an IPv4 or IPv6 network",
            id="bad-cidr",
        ),
        pytest.param(
            "[upstreams.users]\ntargets = []",
            "upstreams.users.targets: must not be empty",
            id="empty-targets",
        ),
        pytest.param(
            "[upstreams.users]\nbalancer = 'weighted'",
            "upstreams.users.targets: required",
            id="missing-targets",
        ),
        pytest.param(
            '[upstreams.users]\nbalancer = "weighted"\n'
            'targets = ["http://a:1", { url = "http://a:1", weight = 2 }]',
            'upstreams.users.targets[1].url: duplicate target "http://a:1" (also targets[0])',
            id="duplicate-target",
        ),
        pytest.param(
            '[upstreams.users]\ntargets = ["ftp://a:1"]',
            'upstreams.users.targets[0]: scheme must be http or https, got "ftp://a:1"',
            id="target-scheme",
        ),
        pytest.param(
            '[upstreams.users]\ntargets = ["127.0.0.1:9001"]',
            'upstreams.users.targets[0]: scheme must be http or https, got "127.0.0.1:9001"',
            id="target-without-scheme",
        ),
        pytest.param(
            '[upstreams.users]\ntargets = ["http:///x"]',
            'upstreams.users.targets[0]: URL has no host: "http:///x"',
            id="target-without-host",
        ),
        pytest.param(
            '[upstreams.users]\ntargets = ["http://a:port"]',
            'upstreams.users.targets[0]: invalid URL "http://a:port": '
            "port can't be converted to integer",
            id="target-bad-port",
        ),
        pytest.param(
            '[upstreams.users]\ntargets = [{ url = "http://a:1/?x=1" }]',
            "upstreams.users.targets[0].url: "
            'a target URL must not have a query or fragment: "http://a:1/?x=1"',
            id="target-query",
        ),
        pytest.param(
            '[upstreams.users]\ntargets = ["http://a:1#frag"]',
            'upstreams.users.targets[0]: a target URL must not have a query or fragment: "http://a:1#frag"',
            id="target-fragment",
        ),
        pytest.param(
            "[upstreams.users]\ntargets = [{ weight = 2 }]",
            "upstreams.users.targets[0].url: required",
            id="target-url-missing",
        ),
        pytest.param(
            '[server]\nlisten = ["127.0.0.1:8080", "localhost"]',
            'server.listen[1]: invalid address "localhost": '
            'expected "host:port", "[ipv6]:port" or "unix:/path"',
            id="listen-no-port",
        ),
        pytest.param(
            '[server]\nlisten = ["::1:8080"]',
            'server.listen[0]: invalid address "::1:8080": '
            "an IPv6 address needs brackets, as in [::1]:8080",
            id="listen-ipv6-without-brackets",
        ),
        pytest.param(
            '[server]\nlisten = ["0.0.0.0:65536"]',
            'server.listen[0]: invalid address "0.0.0.0:65536": port must be 0-65535',
            id="listen-port-range",
        ),
        pytest.param(
            "[server]\nlisten = []",
            "server.listen: must name at least one address",
            id="listen-empty",
        ),
        pytest.param(
            '[server]\nadmin = "127.0.0.1"',
            'server.admin: invalid address "127.0.0.1": '
            'expected "host:port", "[ipv6]:port" or "unix:/path"',
            id="admin-no-port",
        ),
        pytest.param(
            '[server]\nlisten = ["127.0.0.1:8080"]\nadmin = "127.0.0.1:8080"',
            "server.admin: same address as server.listen[0]",
            id="admin-clashes-with-listen",
        ),
        pytest.param(
            "[server]\ndrain_timeout = -1.0",
            "server.drain_timeout: must be >= 0",
            id="drain-timeout-negative",
        ),
        pytest.param(
            "[server]\nclient_timeout = 0",
            "server.client_timeout: must be > 0",
            id="client-timeout-zero",
        ),
        pytest.param(
            "[server]\nclient_timeout = nan",
            "server.client_timeout: must be a finite number of seconds",
            id="client-timeout-nan",
        ),
        pytest.param(
            "[defaults]\nconnect_timeout = 0.0",
            "defaults.connect_timeout: must be > 0",
            id="defaults-connect-timeout-zero",
        ),
        pytest.param(
            doc("read_timeout = -5"),
            'routes[0] ("r").read_timeout: must be > 0',
            id="route-read-timeout-negative",
        ),
        pytest.param(
            doc("max_body_bytes = -1"),
            'routes[0] ("r").max_body_bytes: must be >= 0',
            id="max-body-bytes-negative",
        ),
        pytest.param(
            "[defaults]\nretries = -1",
            "defaults.retries: must be >= 0",
            id="retries-negative",
        ),
        pytest.param(
            UPSTREAM + "[upstreams.users.health]\ninterval = 0",
            "upstreams.users.health.interval: must be > 0",
            id="health-interval-zero",
        ),
        pytest.param(
            UPSTREAM + "[upstreams.users.health]\ntimeout = -1.0",
            "upstreams.users.health.timeout: must be > 0",
            id="health-timeout-negative",
        ),
        pytest.param(
            UPSTREAM + "[upstreams.users.health]\nhealthy_threshold = 0",
            "upstreams.users.health.healthy_threshold: must be > 0",
            id="healthy-threshold-zero",
        ),
        pytest.param(
            UPSTREAM + "[upstreams.users.health]\nunhealthy_threshold = 0",
            "upstreams.users.health.unhealthy_threshold: must be > 0",
            id="unhealthy-threshold-zero",
        ),
        pytest.param(
            UPSTREAM + '[upstreams.users.health]\npath = "healthz"',
            'upstreams.users.health.path: must start with "/"',
            id="health-path-without-slash",
        ),
        pytest.param(
            UPSTREAM + "[upstreams.users.breaker]\nfailures = 0",
            "upstreams.users.breaker.failures: must be > 0",
            id="breaker-failures-zero",
        ),
        pytest.param(
            UPSTREAM + "[upstreams.users.breaker]\ncooldown = 0",
            "upstreams.users.breaker.cooldown: must be > 0",
            id="breaker-cooldown-zero",
        ),
        pytest.param(
            doc("[routes.rate_limit]\nrate = 0\nburst = 10"),
            'routes[0] ("r").rate_limit.rate: must be a finite number > 0',
            id="rate-zero",
        ),
        pytest.param(
            doc("[routes.rate_limit]\nrate = 1\nburst = 0"),
            'routes[0] ("r").rate_limit.burst: must be > 0',
            id="burst-zero",
        ),
        pytest.param(
            doc("[routes.rate_limit]\nburst = 5"),
            'routes[0] ("r").rate_limit.rate: required',
            id="rate-missing",
        ),
        pytest.param(
            doc("[routes.rate_limit]\nrate = 1\nburst = 1\nkey = 'ip'"),
            'routes[0] ("r").rate_limit.key: '
            'must be "client_ip", "route", "consumer" or "header:NAME", got "ip"',
            id="rate-key-unknown",
        ),
        pytest.param(
            doc("[routes.rate_limit]\nrate = 1\nburst = 1\nkey = 'header:X Api'"),
            'routes[0] ("r").rate_limit.key: '
            'must be "client_ip", "route", "consumer" or "header:NAME", got "header:X Api"',
            id="rate-key-bad-header-name",
        ),
        pytest.param(
            doc('methods = ["GET", "GE T"]'),
            'routes[0] ("r").methods[1]: "GE T" is not a valid HTTP method',
            id="method-not-a-token",
        ),
        pytest.param(
            doc("methods = []"),
            'routes[0] ("r").methods: must not be empty (leave it out to allow every method)',
            id="methods-empty",
        ),
        pytest.param(
            doc('host = "api.*.example.com"'),
            'routes[0] ("r").host: wildcard "*" is allowed only as the first label, '
            'as in "*.example.com"',
            id="host-wildcard-not-first",
        ),
        pytest.param(
            doc('host = "*api.example.com"'),
            'routes[0] ("r").host: wildcard "*" must be a whole label, as in "*.example.com"',
            id="host-partial-wildcard",
        ),
        pytest.param(
            doc('host = "api.example.com:8080"'),
            'routes[0] ("r").host: must not include a port (host matching ignores the port)',
            id="host-with-port",
        ),
        pytest.param(
            doc('host = "api..example.com"'),
            'routes[0] ("r").host: empty label in "api..example.com"',
            id="host-empty-label",
        ),
        pytest.param(
            doc('headers = { "x canary" = "1" }'),
            'routes[0] ("r").headers."x canary": "x canary" is not a valid header name',
            id="header-name-not-a-token",
        ),
        pytest.param(
            doc('headers = { X-A = "1", x-a = "2" }'),
            'routes[0] ("r").headers.x-a: duplicate header name (names are case-insensitive)',
            id="header-duplicate",
        ),
        pytest.param(
            doc('path_regex = "^/x"', upstream=UPSTREAM).replace('path = "/"\n', "")
            + "strip_prefix = true",
            'routes[0] ("r").strip_prefix: needs path (a regex has no prefix to strip)',
            id="strip-prefix-with-regex",
        ),
        pytest.param(
            doc("[routes.cors]\nallow_credentials = true"),
            'routes[0] ("r").cors.allow_credentials: '
            'cannot be true with allow_origins = ["*"]; list the origins instead',
            id="cors-credentials-with-star",
        ),
        pytest.param(
            doc("[routes.cors]\nallow_origins = ['https://app.example.com/']"),
            'routes[0] ("r").cors.allow_origins[0]: "https://app.example.com/" '
            'is not "*" or an origin like "https://app.example.com"',
            id="cors-origin-with-path",
        ),
        pytest.param(
            doc("[routes.cors]\nmax_age = -1"),
            'routes[0] ("r").cors.max_age: must be >= 0',
            id="cors-max-age-negative",
        ),
        pytest.param(
            "[upstreams.users]\nbalancer = 'random'\ntargets = ['http://a:1']",
            'upstreams.users.balancer: must be one of "round_robin", "weighted", '
            '"least_connections", "ip_hash", got "random"',
            id="unknown-balancer",
        ),
        pytest.param(
            "[server]\naccess_log = 'xml'",
            'server.access_log: must be one of "json", "text", "off", got "xml"',
            id="unknown-access-log-format",
        ),
    ],
)
def test_each_problem_is_one_error_naming_its_key(text: str, expected: str) -> None:
    assert errors(text) == [expected]


def test_upstream_names_that_are_not_bare_keys_are_quoted() -> None:
    assert errors('[upstreams."my api"]\ntargets = []') == [
        'upstreams."my api".targets: must not be empty'
    ]


def test_route_without_a_name_is_labelled_by_index_only() -> None:
    assert errors(UPSTREAM + '[[routes]]\npath = "/"\nupstream = "nope"') == [
        "routes[0].name: required",
        'routes[0].upstream: unknown upstream "nope"',
    ]


# -- every error at once ------------------------------------------------------


def test_every_problem_in_a_file_is_reported() -> None:
    found = errors(
        """
typo = 1

[server]
listen = ["nowhere"]
drain_timeout = -1

[defaults]
retries = -1

[upstreams.users]
balancer = "fastest"
targets = ["http://a:1", { url = "http://b:1", weight = 0 }, "http://a:1"]

[upstreams.users.health]
interval = 0

[[routes]]
name = "users-api"
path = "users"
upstream = "userz"
methods = ["G E T"]

[routes.rate_limit]
rate = -1
burst = 0

[[routes]]
name = "users-api"
path_regex = "["
upstream = "users"
"""
    )
    assert found == [
        "typo: unknown key",
        'server.listen[0]: invalid address "nowhere": '
        'expected "host:port", "[ipv6]:port" or "unix:/path"',
        "server.drain_timeout: must be >= 0",
        "defaults.retries: must be >= 0",
        'upstreams.users.balancer: must be one of "round_robin", "weighted", '
        '"least_connections", "ip_hash", got "fastest"',
        "upstreams.users.targets[1].weight: must be > 0",
        'upstreams.users.targets[2]: duplicate target "http://a:1" (also targets[0])',
        "upstreams.users.health.interval: must be > 0",
        'routes[0] ("users-api").upstream: unknown upstream "userz"; did you mean "users"?',
        'routes[0] ("users-api").path: must start with "/"',
        'routes[0] ("users-api").methods[0]: "G E T" is not a valid HTTP method',
        'routes[0] ("users-api").rate_limit.rate: must be a finite number > 0',
        'routes[0] ("users-api").rate_limit.burst: must be > 0',
        'routes[1] ("users-api").name: duplicate route name "users-api" (also routes[0])',
        'routes[1] ("users-api").path_regex: invalid regex: '
        "unterminated character set at position 0",
    ]
    assert len(found) == 15


def test_several_bad_keys_in_one_table_are_all_reported() -> None:
    # msgspec stops at the first error; the loader must keep going.
    found = errors(
        '[server]\nlistne = 1\nadmn = ""\ndrain_timeout = "30"\naccess_log = 1\nclient_timeout = 0'
    )
    assert found == [
        'server.listne: unknown key; did you mean "listen"?',
        'server.admn: unknown key; did you mean "admin"?',
        "server.drain_timeout: Expected `float`, got `str`",
        "server.access_log: Expected `str`, got `int`",
        "server.client_timeout: must be > 0",
    ]


def test_a_key_with_a_type_error_gets_no_second_error() -> None:
    # path is dropped after its type error: no "required (or path_regex)" on top
    assert errors(UPSTREAM + '[[routes]]\nname = "r"\npath = 1\nupstream = "users"') == [
        'routes[0] ("r").path: Expected `str`, got `int`'
    ]


# -- unknown keys and wrong types ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rotues = []", 'rotues: unknown key; did you mean "routes"?'),
        ('"odd key" = 1', '"odd key": unknown key'),
        ("[server]\nlisten_on = []", 'server.listen_on: unknown key; did you mean "listen"?'),
        (
            "[defaults]\ntimeout = 1.0",
            'defaults.timeout: unknown key; did you mean "read_timeout"?',
        ),
        (UPSTREAM + "retry = 1", "upstreams.users.retry: unknown key"),
        (
            '[upstreams.users]\ntargets = [{ url = "http://a:1", wieght = 2 }]',
            'upstreams.users.targets[0].wieght: unknown key; did you mean "weight"?',
        ),
        (
            UPSTREAM + "[upstreams.users.health]\nport = 1",
            "upstreams.users.health.port: unknown key",
        ),
        (
            UPSTREAM + "[upstreams.users.breaker]\nthreshold = 1",
            "upstreams.users.breaker.threshold: unknown key",
        ),
        (doc("prefix = '/x'"), 'routes[0] ("r").prefix: unknown key; did you mean "strip_prefix"?'),
        (
            doc("[routes.rate_limit]\nrate = 1\nburst = 1\nper = 'ip'"),
            'routes[0] ("r").rate_limit.per: unknown key',
        ),
        (
            doc("[routes.cors]\norigins = ['*']"),
            'routes[0] ("r").cors.origins: unknown key; did you mean "allow_origins"?',
        ),
    ],
)
def test_unknown_keys_are_errors_at_every_level(text: str, expected: str) -> None:
    assert errors(text) == [expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[upstreams.users]\ntargets = [{ url = "http://a:1", weight = "3" }]',
            "upstreams.users.targets[0].weight: Expected `int`, got `str`",
        ),
        (
            "[upstreams.users]\ntargets = [3]",
            "upstreams.users.targets[0]: Expected `str` or `table`, got `int`",
        ),
        (
            "[upstreams.users]\ntargets = 'http://a:1'",
            "upstreams.users.targets: Expected `array`, got `str`",
        ),
        (UPSTREAM + "health = 1", "upstreams.users.health: Expected `table`, got `int`"),
        (
            "[server]\nlisten = ['127.0.0.1:1', 2]",
            "server.listen[1]: Expected `str` or `table`, got `int`",
        ),
        ("[server]\ndrain_timeout = true", "server.drain_timeout: Expected `float`, got `bool`"),
        ("server = 1", "server: Expected `table`, got `int`"),
        ("upstreams = []", "upstreams: Expected `table`, got `array`"),
        ("upstreams = { users = 1 }", "upstreams.users: Expected `table`, got `int`"),
        ("routes = 1", "routes: Expected `array` of tables, got `int`"),
        ("routes = [1]", "routes[0]: Expected `table`, got `int`"),
        (doc("priority = 1.5"), 'routes[0] ("r").priority: Expected `int`, got `float`'),
        (doc("strip_prefix = 'yes'"), 'routes[0] ("r").strip_prefix: Expected `bool`, got `str`'),
        (doc("methods = ['GET', 1]"), 'routes[0] ("r").methods[1]: Expected `str`, got `int`'),
        (doc("headers = { x-a = 1 }"), 'routes[0] ("r").headers.x-a: Expected `str`, got `int`'),
        (
            doc("[routes.rate_limit]\nrate = 1\nburst = 2.5"),
            'routes[0] ("r").rate_limit.burst: Expected `int`, got `float`',
        ),
        (doc("cors = 'yes'"), 'routes[0] ("r").cors: Expected `table`, got `str`'),
    ],
)
def test_wrong_types_name_the_key(text: str, expected: str) -> None:
    assert errors(text) == [expected]


def test_integers_are_accepted_for_durations() -> None:
    config = parse("[server]\ndrain_timeout = 10\n[defaults]\nread_timeout = 5")
    assert config.server.drain_timeout == 10.0
    assert isinstance(config.server.drain_timeout, float)


# -- syntax, files, immutability ----------------------------------------------


def test_toml_syntax_error_is_one_error_naming_the_line() -> None:
    found = errors('[server]\nlisten = ["127.0.0.1:8080"\nadmin = ""\n')
    assert len(found) == 1
    assert found[0].startswith("<string>: ")
    assert "line 3" in found[0]


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text("[server\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    [line] = info.value.errors
    assert line.startswith(f"{path}: ")
    assert "line 1" in line


def test_invalid_utf8_is_an_error() -> None:
    with pytest.raises(ConfigError, match="not UTF-8"):
        parse(b"[server]\nadmin = '\xff'\n")


def test_load_records_path_and_sha256_of_the_bytes(tmp_path: Path) -> None:
    data = doc().encode()
    path = tmp_path / "routes.toml"
    path.write_bytes(data)
    config = load(str(path))
    assert config.sha256 == hashlib.sha256(data).hexdigest()
    assert config.path == str(path)
    assert parse(data).sha256 == config.sha256
    assert parse(data.decode()).sha256 == config.sha256


def test_load_of_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert info.value.errors == [f"{path}: cannot read: No such file or directory"]


def test_config_is_frozen() -> None:
    config = parse(doc())
    with pytest.raises(AttributeError):
        config.path = "elsewhere"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.server.admin = ""  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.routes[0].name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.upstreams["users"].targets[0].weight = 9  # type: ignore[misc]


def test_config_round_trips_through_msgspec() -> None:
    config = parse(doc("[routes.rate_limit]\nrate = 1\nburst = 2"))
    assert msgspec.json.decode(msgspec.json.encode(config), type=Config) == config


# -- parse_listen_address -----------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:80", ("localhost", 80)),
        ("[::1]:9901", ("::1", 9901)),
        ("[::]:443", ("::", 443)),
        ("unix:/run/gateway.sock", "/run/gateway.sock"),
    ],
)
def test_parse_listen_address(addr: str, expected: tuple[str, int] | str) -> None:
    assert parse_listen_address(addr) == expected


@pytest.mark.parametrize(
    "addr",
    [
        "",
        "8080",
        ":8080",
        "host:",
        "host:http",
        "host:70000",
        "::1:80",
        "[::g]:80",
        "unix:",
        "a b:1",
    ],
)
def test_parse_listen_address_rejects(addr: str) -> None:
    with pytest.raises(ValueError, match="invalid address"):
        parse_listen_address(addr)


@given(st.ip_addresses(), st.integers(min_value=0, max_value=65535))
def test_parse_listen_address_round_trips_ip_literals(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    host = str(ip)
    addr = f"[{host}]:{port}" if ip.version == 6 else f"{host}:{port}"
    assert parse_listen_address(addr) == (host, port)


# -- summary ------------------------------------------------------------------


def test_summary_shows_listeners_upstreams_and_routes() -> None:
    config = parse(
        """
[server]
listen = ["127.0.0.1:8080", "unix:/tmp/gw.sock"]
admin = ""

[upstreams.users]
balancer = "weighted"
targets = ["http://127.0.0.1:9001", { url = "http://127.0.0.1:9002", weight = 3 }]

[upstreams.users.health]
path = "/ready"

[[routes]]
name = "users-api"
host = "api.example.com"
path = "/api/users"
methods = ["GET"]
upstream = "users"
max_body_bytes = 1024

[routes.rate_limit]
rate = 100.0
burst = 200
"""
    )
    text = summary(config)
    assert "127.0.0.1:8080, unix:/tmp/gw.sock" in text
    assert "admin      off" in text
    assert "users: weighted, health /ready every 5s" in text
    assert "http://127.0.0.1:9002 weight 3" in text
    assert "users-api: host api.example.com  path /api/users  methods GET -> users" in text
    assert "body 1024 bytes" in text
    assert "rate_limit 100/s burst 200 by client_ip" in text
    assert len(text.splitlines()) == 11


# -- methods: tokens, and a near-miss of a standard method is a typo -----------


@pytest.mark.parametrize(
    ("method", "meant"),
    [("GTE", "GET"), ("gte", "GET"), ("DELTE", "DELETE"), ("POTS", "POST"), ("OPTION", "OPTIONS")],
)
def test_a_method_one_edit_from_a_standard_one_is_refused_with_a_guess(
    method: str, meant: str
) -> None:
    assert errors(doc(f'methods = ["GET", "{method}"]')) == [
        f'routes[0] ("r").methods[1]: unknown method "{method}"; did you mean "{meant}"?'
    ]


@pytest.mark.parametrize("method", ["PURGE", "PROPPATCH", "MKCOL", "QUERY", "FETCH", "X-SYNC"])
def test_registered_and_extension_methods_are_accepted_as_written(method: str) -> None:
    # RFC 9110 section 9.1: methods are extensible; PROPPATCH is no misspelt PATCH.
    [route] = parse(doc(f'methods = ["{method}"]')).routes
    assert route.methods == (method,)


def test_cors_allow_methods_get_the_same_method_check() -> None:
    assert errors(doc("[routes.cors]\nallow_methods = ['*', 'PTACH']")) == [
        'routes[0] ("r").cors.allow_methods[1]: unknown method "PTACH"; did you mean "PATCH"?'
    ]


# -- weight only where the balancer reads it -----------------------------------


@pytest.mark.parametrize(
    ("balancer", "chosen"),
    [("", "the default balancer"), ('balancer = "round_robin"\n', "balancer")],
)
def test_a_weight_under_round_robin_is_refused_not_ignored(balancer: str, chosen: str) -> None:
    text = (
        f"[upstreams.users]\n{balancer}"
        'targets = ["http://a:1", { url = "http://b:1", weight = 3 }]'
    )
    assert errors(text) == [
        f'upstreams.users.targets[1].weight: weight has no effect with {chosen} "round_robin"; '
        'use balancer = "weighted" (or "least_connections" / "ip_hash")'
    ]


@pytest.mark.parametrize("balancer", ["weighted", "least_connections", "ip_hash"])
def test_a_weight_under_a_balancer_that_reads_it_is_accepted(balancer: str) -> None:
    text = (
        f'[upstreams.users]\nbalancer = "{balancer}"\n'
        'targets = ["http://a:1", { url = "http://b:1", weight = 3 }]'
    )
    assert parse(text).upstreams["users"].targets[1].weight == 3


def test_weight_1_means_the_same_under_round_robin_and_is_accepted() -> None:
    text = '[upstreams.users]\ntargets = [{ url = "http://b:1", weight = 1 }]'
    assert parse(text).upstreams["users"].balancer == "round_robin"


def test_a_bad_balancer_name_gets_no_second_error_about_weights() -> None:
    text = (
        '[upstreams.users]\nbalancer = "weigthed"\ntargets = [{ url = "http://b:1", weight = 3 }]'
    )
    assert errors(text) == [
        'upstreams.users.balancer: must be one of "round_robin", "weighted", '
        '"least_connections", "ip_hash", got "weigthed"; did you mean "weighted"?'
    ]


# -- one mistake, one error ----------------------------------------------------


def test_a_bad_regex_with_strip_prefix_is_one_error_not_two() -> None:
    text = (
        UPSTREAM
        + '[[routes]]\nname = "r"\npath_regex = "(["\nstrip_prefix = true\nupstream = "users"'
    )
    assert errors(text) == [
        'routes[0] ("r").path_regex: invalid regex: unterminated character set at position 1'
    ]


def test_path_and_regex_with_strip_prefix_does_not_claim_path_is_missing() -> None:
    assert errors(doc('path_regex = "^/x$"\nstrip_prefix = true')) == [
        'routes[0] ("r").path_regex: cannot be set together with path'
    ]


# -- did you mean: names -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[server]\naccess_log = "jsno"',
            'server.access_log: must be one of "json", "text", "off", got "jsno"; '
            'did you mean "json"?',
        ),
        (
            UPSTREAM + 'balancer = "roundrobin"',
            'upstreams.users.balancer: must be one of "round_robin", "weighted", '
            '"least_connections", "ip_hash", got "roundrobin"; did you mean "round_robin"?',
        ),
        (
            doc("[routes.rate_limit]\nrate = 1\nburst = 1\nkey = 'client-ip'"),
            'routes[0] ("r").rate_limit.key: must be "client_ip", "route", "consumer" or '
            '"header:NAME", '
            'got "client-ip"; did you mean "client_ip"?',
        ),
        (
            doc("[routes.rate_limit]\nrate = 1\nburst = 1\nkey = 'headers:X-Api-Key'"),
            'routes[0] ("r").rate_limit.key: must be "client_ip", "route", "consumer" or '
            '"header:NAME", '
            'got "headers:X-Api-Key"; did you mean "header:X-Api-Key"?',
        ),
        (
            doc("[routes.rate_limit]\nrate = 1\nburst = 1\nkey = 'Header:X-Api-Key'"),
            'routes[0] ("r").rate_limit.key: must be "client_ip", "route", "consumer" or '
            '"header:NAME", '
            'got "Header:X-Api-Key"; did you mean "header:X-Api-Key"?',
        ),
    ],
)
def test_a_misspelt_name_gets_the_nearest_valid_one(text: str, expected: str) -> None:
    assert errors(text) == [expected]


@pytest.mark.parametrize(
    "text",
    [
        '[server]\naccess_log = "syslog"',
        doc("[routes.rate_limit]\nrate = 1\nburst = 1\nkey = 'cookie:session'"),
        doc("[routes.rate_limit]\nrate = 1\nburst = 1\nkey = 'header:'"),
        doc().replace('upstream = "users"', 'upstream = "payments"'),
        "[server]\nzzz = 1",
        doc('methods = ["G E T"]'),
    ],
)
def test_no_guess_when_nothing_is_close(text: str) -> None:
    [error] = errors(text)
    assert "did you mean" not in error


def test_the_guess_for_an_unknown_upstream_comes_from_the_file() -> None:
    text = (
        '[upstreams."users v2"]\ntargets = ["http://a:1"]\n'
        '[upstreams.billing]\ntargets = ["http://b:1"]\n'
        '[[routes]]\nname = "r"\npath = "/"\nupstream = "users v3"\n'
    )
    assert errors(text) == [
        'routes[0] ("r").upstream: unknown upstream "users v3"; did you mean "users v2"?'
    ]


# -- line numbers --------------------------------------------------------------


def test_each_error_names_the_line_of_its_key() -> None:
    text = """\
[server]
listne = ["127.0.0.1:8080"]

[upstreams.users]
targets = [
  "http://a:1",
  # the weight below
  { url = "http://b:1", weight = 3 },
]

[[routes]]
name = "first"
path = "/"
upstream = "users"

[[routes]]
name = "users-api"
path = "/api"
upstream = "userz"
methods = ["GTE"]

[routes.rate_limit]
rate = -1
burst = 1
"""
    assert located(text) == [
        'server.listne: unknown key (line 2); did you mean "listen"?',
        "upstreams.users.targets[1].weight: weight has no effect with the default balancer "
        '"round_robin"; use balancer = "weighted" (or "least_connections" / "ip_hash") (line 8)',
        'routes[1] ("users-api").upstream: unknown upstream "userz" (line 19); '
        'did you mean "users"?',
        'routes[1] ("users-api").methods[0]: unknown method "GTE" (line 20); did you mean "GET"?',
        'routes[1] ("users-api").rate_limit.rate: must be a finite number > 0 (line 23)',
    ]


def test_a_missing_key_points_at_its_table() -> None:
    text = '\n\n[[routes]]\nupstream = "nowhere"\npath = "/"\n'
    assert located(text) == [
        "routes[0].name: required (line 3)",
        'routes[0].upstream: unknown upstream "nowhere" (line 4)',
    ]


def test_lines_are_not_fooled_by_strings_that_look_like_keys() -> None:
    # A multi-line string holding "[[routes]]" and "upstream = ..." must not shift
    # the count of routes or the line of the real key.
    text = (
        UPSTREAM
        + '[[routes]]\nname = "a"\npath = "/a"\nupstream = "users"\n'
        + 'headers = { x-note = """\n[[routes]]\nupstream = "x"\n""" }\n'
        + '[[routes]]\nname = \'b "quoted" \\ name\'\npath = "/b"\nupstream = "userz"\n'
    )
    found = located(text)
    assert found[-1] == (
        r'routes[1] ("b \"quoted\" \\ name").upstream: unknown upstream "userz" (line 15); '
        'did you mean "users"?'
    )


def test_quoted_and_dotted_keys_get_their_lines() -> None:
    text = '[upstreams."a.b"]\ntargets = ["http://a:1"]\nhealth.path = "x"\n'
    assert located(text) == ['upstreams."a.b".health.path: must start with "/" (line 3)']


# -- never dark: panic_threshold and the breaker's max_cooldown ----------------


def test_breaker_and_panic_defaults_apply_without_their_keys() -> None:
    upstream = parse(doc()).upstreams["users"]
    assert upstream.panic_threshold == 0.5
    assert (upstream.breaker.failures, upstream.breaker.cooldown) == (5, 5.0)
    assert upstream.breaker.max_cooldown == 60.0


@pytest.mark.parametrize("value", ["0", "0.0", "0.25", "1", "1.0"])
def test_panic_threshold_accepts_shares_from_0_to_1(value: str) -> None:
    upstream = UPSTREAM + f"panic_threshold = {value}\n"
    assert parse(doc(upstream=upstream)).upstreams["users"].panic_threshold == float(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-0.1", "must be a share between 0 and 1"),
        ("1.01", "must be a share between 0 and 1"),
        ("50", "must be a share between 0 and 1"),
        ("nan", "must be a share between 0 and 1"),
        ("inf", "must be a share between 0 and 1"),
        ('"half"', "Expected `float`, got `str`"),
        ("true", "Expected `float`, got `bool`"),
    ],
)
def test_panic_threshold_outside_0_to_1_is_refused(value: str, message: str) -> None:
    upstream = UPSTREAM + f"panic_threshold = {value}\n"
    assert errors(doc(upstream=upstream)) == [f"upstreams.users.panic_threshold: {message}"]


def test_max_cooldown_below_cooldown_is_refused_with_its_key_path() -> None:
    upstream = UPSTREAM + "[upstreams.users.breaker]\ncooldown = 10.0\nmax_cooldown = 5.0\n"
    assert errors(doc(upstream=upstream)) == [
        "upstreams.users.breaker.max_cooldown: must be >= cooldown (10s)"
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "must be > 0"),
        ("-1.0", "must be > 0"),
        ("nan", "must be a finite number of seconds"),
        ("inf", "must be a finite number of seconds"),
    ],
)
def test_hostile_max_cooldown_is_refused(value: str, message: str) -> None:
    upstream = UPSTREAM + f"[upstreams.users.breaker]\ncooldown = 0.5\nmax_cooldown = {value}\n"
    problems = errors(doc(upstream=upstream))
    assert f"upstreams.users.breaker.max_cooldown: {message}" in problems


def test_long_cooldown_alone_raises_max_cooldown_to_it() -> None:
    upstream = UPSTREAM + "[upstreams.users.breaker]\ncooldown = 120.0\n"
    breaker = parse(doc(upstream=upstream)).upstreams["users"].breaker
    assert (breaker.cooldown, breaker.max_cooldown) == (120.0, 120.0)


def test_every_never_dark_error_is_reported_at_once() -> None:
    upstream = (
        UPSTREAM
        + "panic_threshold = 2\n[upstreams.users.breaker]\ncooldown = 10.0\nmax_cooldown = 1.0\n"
    )
    assert errors(doc(upstream=upstream)) == [
        "upstreams.users.breaker.max_cooldown: must be >= cooldown (10s)",
        "upstreams.users.panic_threshold: must be a share between 0 and 1",
    ]


def test_summary_shows_the_breaker_cooldowns_and_panic() -> None:
    text = summary(parse(doc()))
    assert "breaker 5 failures/5s..60s, panic below 50% available" in text
    off = summary(parse(doc(upstream=UPSTREAM + "panic_threshold = 0\n")))
    assert "panic off" in off


# -- [redis] and store = "redis" ------------------------------------------------

LIMIT = '[routes.rate_limit]\nrate = 1.0\nburst = 1\nstore = "redis"\n'


def test_redis_table_and_store_resolve_with_defaults() -> None:
    config = parse(doc(LIMIT, top="[redis]\n"))
    assert config.redis is not None
    assert config.redis.url == "redis://127.0.0.1:6379/0"
    assert config.redis.timeout == 0.05
    assert config.routes[0].rate_limit is not None
    assert config.routes[0].rate_limit.store == "redis"
    assert parse(doc()).redis is None


def test_store_redis_without_a_redis_table_is_an_error() -> None:
    assert errors(doc(LIMIT)) == [
        'routes[0] ("r").rate_limit.store: needs a [redis] table (its url) for store = "redis"'
    ]


@pytest.mark.parametrize(
    ("redis", "expected"),
    [
        (
            'url = "http://127.0.0.1:6379"',
            'redis.url: scheme must be redis, rediss or unix, got "http://127.0.0.1:6379"',
        ),
        ('url = "redis://"', 'redis.url: URL has no host: "redis://"'),
        (
            'url = "redis://h:6379/x"',
            'redis.url: the path must be a database number, as in redis://host:6379/0: "redis://h:6379/x"',
        ),
        (
            'url = "unix://"',
            'redis.url: a unix URL needs the socket path, as in unix:///run/redis.sock: "unix://"',
        ),
        ('url = "redis://h:99999"', "redis.url: invalid URL"),
        ("timeout = 0", "redis.timeout: must be > 0"),
        ("timeout = nan", "redis.timeout: must be a finite number of seconds"),
        ("timeout = inf", "redis.timeout: must be a finite number of seconds"),
        ('timeout = "1"', "redis.timeout: Expected `float`, got `str`"),
        ('urll = "redis://h"', 'redis.urll: unknown key; did you mean "url"?'),
    ],
)
def test_bad_redis_table_names_the_key(redis: str, expected: str) -> None:
    (error,) = errors(doc(top=f"[redis]\n{redis}\n"))
    assert error.startswith(expected)


def test_misspelt_store_suggests_redis_with_the_line() -> None:
    assert located(doc(LIMIT.replace('"redis"', '"rediss"'), top="[redis]\n")) == [
        'routes[0] ("r").rate_limit.store: must be one of "local", "redis", got "rediss" '
        '(line 14); did you mean "redis"?'
    ]


def test_summary_shows_the_redis_host_never_its_password() -> None:
    text = summary(parse(doc(LIMIT, top='[redis]\nurl = "redis://:s3cret@10.0.0.5:6380/2"\n')))
    assert "redis      redis://10.0.0.5:6380, timeout 0.05s" in text
    assert "s3cret" not in text
    assert "store redis" in text


# -- dns / srv targets ------------------------------------------------------------


def _discovery(targets: str, extra: str = "") -> str:
    return doc(upstream=f"[upstreams.users]\ntargets = [{targets}]\n{extra}\n")


def test_dns_and_srv_targets_resolve_with_refresh_and_nameservers() -> None:
    config = parse(
        _discovery(
            '"http://127.0.0.1:1", { dns = "Users.Internal.:8080" }, '
            '{ srv = "_http._tcp.users.service.consul" }',
            'dns_refresh = 2.5\nnameservers = ["127.0.0.1:8600", "::1", "[::1]:53"]',
        )
    )
    up = config.upstreams["users"]
    assert [t.url for t in up.targets] == ["http://127.0.0.1:1"]
    assert [(d.kind, d.name, d.port) for d in up.discover] == [
        ("dns", "users.internal", 8080),
        ("srv", "_http._tcp.users.service.consul", 0),
    ]
    assert up.dns_refresh == 2.5
    assert up.nameservers == ("127.0.0.1:8600", "::1", "[::1]:53")
    assert "dns Users.Internal.:8080 every 2.5s via 127.0.0.1:8600" in summary(config)


def test_an_upstream_of_dns_targets_only_is_valid() -> None:
    up = parse(_discovery('{ dns = "users.internal:80" }')).upstreams["users"]
    assert up.targets == ()
    assert up.dns_refresh == 10.0


@pytest.mark.parametrize(
    ("targets", "extra", "expected"),
    [
        (
            '{ dns = "users.internal" }',
            "",
            'targets[0].dns: must be "host:port" with a port 1-65535',
        ),
        ('{ dns = "users.internal:0" }', "", 'targets[0].dns: must be "host:port" with a port'),
        ('{ dns = "users.internal:99999" }', "", 'targets[0].dns: must be "host:port"'),
        ('{ dns = ":80" }', "", "targets[0].dns: must be a DNS name"),
        ('{ dns = "a..b:80" }', "", 'targets[0].dns: empty label in "a..b"'),
        ('{ dns = "bad name:80" }', "", 'targets[0].dns: invalid character in "bad name"'),
        ('{ dns = "ü.example:80" }', "", "targets[0].dns: must be ASCII"),
        (f'{{ dns = "{"a" * 64}.x:80" }}', "", "targets[0].dns: label"),
        (f'{{ srv = "{"a." * 130}x" }}', "", "targets[0].srv: a DNS name is at most 253"),
        (
            '{ srv = "_http._tcp.x", weight = 2 }',
            'balancer = "weighted"',
            "targets[0].weight: an srv target takes",
        ),
        ('{ dns = "x:80", url = "http://x" }', "", "targets[0]: set only one of url, dns and srv"),
        ('{ dns = "x:80", dnss = 1 }', "", 'targets[0].dnss: unknown key; did you mean "dns"?'),
        ('{ dns = "x:80" }, { dns = "x:80" }', "", 'targets[1]: duplicate target "x:80"'),
        ('{ dns = "x:80" }', "dns_refresh = 0", "dns_refresh: must be > 0"),
        ('{ dns = "x:80" }', "dns_refresh = 0.01", "dns_refresh: must be >= 0.1 seconds"),
        ('{ dns = "x:80" }', "dns_refresh = nan", "dns_refresh: must be a finite number"),
        (
            '{ dns = "x:80" }',
            'nameservers = ["dns.google"]',
            "nameservers[0]: must be an IP address",
        ),
        ('{ dns = "x:80" }', 'nameservers = ["1.1.1.1:0"]', "nameservers[0]: port must be 1-65535"),
        ('{ dns = "x:80" }', 'nameservers = ["[::1"]', "nameservers[0]: invalid nameserver"),
        (
            '"http://127.0.0.1:1"',
            "dns_refresh = 5.0",
            'dns_refresh: has no effect without a "dns" or "srv" target',
        ),
        (
            '"http://127.0.0.1:1"',
            "dns_refreh = 5.0",
            'dns_refreh: unknown key; did you mean "dns_refresh"?',
        ),
    ],
)
def test_bad_discovery_targets_name_the_key(targets: str, extra: str, expected: str) -> None:
    found = errors(_discovery(targets, extra))
    assert any(error.startswith(f"upstreams.users.{expected}") for error in found), found
