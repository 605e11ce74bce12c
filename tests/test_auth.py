"""The pure identity rules: scope and claim matchers (property tests),
placeholders, CIDR rules, API-key lookup, JWKS parsing of hostile documents,
JWT checks, the config errors `gateway check` prints, and `gateway apikey`."""

from __future__ import annotations

import json
import os
import re
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway import cli
from gateway.core.auth import (
    ApiKeyTable,
    Consumer,
    IpRules,
    JwtPolicy,
    TokenRejected,
    UnknownKid,
    bearer_token,
    claims_match,
    expand,
    has_scopes,
    hash_key,
    parse_jwks,
    parse_keys_file,
    parse_template,
    token_scopes,
    verify_jwt,
)
from gateway.core.config import ConfigError, parse
from gateway.state.auth import TokenCache
from tests.auth_keys import SECRET, claims, jwks, make_key, sign, unsigned

SCOPE = st.text(alphabet="abcdefgh:.", min_size=1, max_size=6)
VALUE = st.one_of(st.text(max_size=5), st.integers(-3, 3), st.booleans())


@given(st.lists(SCOPE, max_size=6), st.lists(SCOPE, max_size=6))
def test_has_scopes_is_the_subset_relation(required: list[str], granted: list[str]) -> None:
    token = {"scope": " ".join(granted)}
    assert has_scopes(required, token_scopes(token)) == set(required).issubset(granted)


@given(st.lists(SCOPE, max_size=6))
def test_scp_arrays_and_scope_strings_grant_the_same(granted: list[str]) -> None:
    assert token_scopes({"scp": granted}) == token_scopes({"scope": " ".join(granted)})


@given(VALUE, st.lists(VALUE, min_size=1, max_size=4))
@example(True, [1])  # a boolean claim never equals a number
@example(1, [True])
def test_a_scalar_claim_matches_when_it_is_one_of_the_values(value: Any, wanted: list[Any]) -> None:
    expected = any(type(value) is type(w) and value == w for w in wanted)
    assert claims_match([("role", tuple(wanted))], {"role": value}) == expected


@given(st.lists(VALUE, max_size=5), st.lists(VALUE, min_size=1, max_size=4))
def test_an_array_claim_matches_when_it_holds_one_of_the_values(
    value: list[Any], wanted: list[Any]
) -> None:
    expected = any(type(v) is type(w) and v == w for v in value for w in wanted)
    assert claims_match([("role", tuple(wanted))], {"role": value}) == expected


def test_a_missing_claim_never_matches() -> None:
    assert not claims_match([("role", ("admin",))], {})
    assert claims_match([], {})


@given(st.text(max_size=20), st.text(max_size=20))
@example("a\r\nX-Evil: 1", "")
@example("", "b\x00")
def test_expansion_never_yields_cr_lf_or_nul(client: str, claim: str) -> None:
    template = parse_template("pre {client_ip} {claim.note} post")
    value = expand(template, {"client_ip": client}, {"note": claim})
    if value is not None:
        assert not re.search(r"[\r\n\x00]", value)
    else:
        assert re.search(r"[\r\n\x00]", client + claim)


def test_templates_know_their_placeholders() -> None:
    assert expand(parse_template("{route}-{claim.sub}"), {"route": "r"}, {"sub": "a"}) == "r-a"
    assert expand(parse_template("{claim.scp}"), {}, {"scp": ["a", "b"]}) == "a b"
    assert expand(parse_template("plain { } text"), {}, {}) == "plain { } text"
    with pytest.raises(ValueError, match="unknown placeholder"):
        parse_template("{clientip}")
    with pytest.raises(ValueError, match="unknown placeholder"):
        parse_template("{path}")  # only for a redirect
    assert parse_template("{path}", ("path",)).parts == ("", "path", "")


def test_ip_rules_deny_first_then_allow() -> None:
    rules = IpRules(["10.0.0.0/8", "::1"], ["10.6.6.0/24"])
    assert rules.admits("10.1.2.3")
    assert not rules.admits("10.6.6.7")
    assert not rules.admits("192.0.2.1")
    assert rules.admits("::1")
    assert rules.admits("::ffff:10.1.2.3")  # IPv4-mapped
    assert not rules.admits("")  # a unix-socket peer: no rule can be evaluated
    assert not rules.admits("not-an-ip")
    assert IpRules([], ["10.6.6.0/24"]).admits("192.0.2.1")


def test_api_key_lookup_finds_only_the_exact_key() -> None:
    table = ApiKeyTable([Consumer(name="acme", key_sha256=hash_key("secret-key"))])
    found = table.find("secret-key")
    assert found is not None
    assert found.name == "acme"
    for wrong in ("secret-ke", "secret-key ", "", "x" * 10_000, "SECRET-KEY"):
        assert table.find(wrong) is None


def test_keys_file_errors_name_their_key() -> None:
    consumers, errors = parse_keys_file(
        '[consumers.a]\nkey_sha256 = "abc"\n'
        '[consumers."b c"]\nkey_sha256 = "' + "0" * 64 + '"\n'
        '[consumers.d]\nkey_sha256 = "' + "0" * 64 + '"\nextra = 1\n'
    )
    assert any(e.startswith('consumers."a".key_sha256') for e in errors)
    assert any(e.startswith('consumers."b c": a name') for e in errors)
    assert any("the same key as consumer" in e for e in errors)
    assert any(e.startswith('consumers."d".extra: unknown key') for e in errors)
    assert [c.name for c in consumers] == ["b c"]


def test_hostile_jwks_documents_yield_no_keys_or_an_error() -> None:
    rsa = make_key("RS256", "a")
    good = rsa.jwk()
    for text in ("", "[]", "{}", '{"keys": {}}', "x" * (2 << 20), "[" * 100_000):
        with pytest.raises(ValueError, match=r"."):
            parse_jwks(text)
    hostile = [
        1,
        None,
        {"kty": "oct", "k": "c2VjcmV0"},  # symmetric keys never come from a JWKS
        {**good, "kid": "k" * 1000},
        {**good, "kid": 7},
        {**good, "use": "enc"},
        {**good, "alg": "HS256"},
        {**good, "n": "AQAB"},  # a 17-bit modulus
        {**good, "n": 12345},
        {"kty": "EC", "crv": "P-999", "x": "AA", "y": "AA"},
        {"kty": "OKP", "crv": {"x": 1}, "x": "AA"},
        {"kty": "RSA"},
    ]
    assert parse_jwks(json.dumps({"keys": hostile})) == []
    keys = parse_jwks(json.dumps({"keys": [*hostile, {**good, "d": "private-part"}]}))
    assert [k.kid for k in keys] == ["a"]


def _policy(**changes: Any) -> JwtPolicy:
    base: dict[str, Any] = {
        "name": "p",
        "algorithms": ("RS256", "HS256"),
        "secret": SECRET,
        "issuer": "https://id.test",
        "audiences": ("orders-api",),
        "leeway": 5.0,
    }
    base.update(changes)
    return JwtPolicy(**base)


def test_verify_jwt_refuses_what_the_contract_refuses() -> None:
    rsa = make_key("RS256", "a")
    keys = parse_jwks(jwks(rsa))
    now = time.time()
    assert verify_jwt(rsa.token(), _policy(), keys, now).claims["sub"] == "alice"
    cases = {
        "invalid": [
            unsigned(claims(), {"alg": "none"}),
            rsa.token(claims(aud="x")),
            rsa.token(claims(iss="x")),
            rsa.token(claims(nbf=int(now) + 100)),
            rsa.token(claims(exp=None)),
            sign(rsa.private, "RS512", claims(), kid="a"),  # not in algorithms
            "a" * 9000,
            "a.b.c",
        ],
        "expired": [rsa.token(claims(exp=int(now) - 100))],
    }
    for reason, tokens in cases.items():
        for token in tokens:
            with pytest.raises(TokenRejected) as info:
                verify_jwt(token, _policy(), keys, now)
            assert info.value.reason == reason, token[:40]
    with pytest.raises(UnknownKid):
        verify_jwt(sign(rsa.private, "RS256", claims(), kid="b"), _policy(), keys, now)
    hs = sign(SECRET, "HS256", claims())
    assert verify_jwt(hs, _policy(), keys, now).fingerprint.startswith("hs:")
    with pytest.raises(TokenRejected):
        verify_jwt(hs, _policy(secret=None), keys, now)  # no secret: HS never passes


def test_token_cache_is_bounded_and_expires_with_the_token() -> None:
    now = [1000.0]
    cache = TokenCache(maxsize=3, clock=lambda: now[0])
    from gateway.core.auth import Identity, Verified

    nobody = Identity("p", None, frozenset(), {})
    for i in range(10):
        cache.put(f"t{i}", Verified(nobody, "f", 1010.0))
    assert len(cache) == 3
    assert cache.get("t9") is not None
    now[0] = 1011.0
    assert cache.get("t9") is None
    cache.put("a", Verified(nobody, "old", 2000.0))
    cache.put("b", Verified(nobody, "new", 2000.0))
    assert cache.retain({"new"}) == 2  # "a" and the one "f" token still held
    assert cache.get("a") is None
    assert cache.get("b") is not None
    assert cache.chars == 1


def test_token_cache_holds_at_most_its_budget_of_token_text() -> None:
    from gateway.core.auth import Identity, Verified

    cache = TokenCache(maxsize=1000, clock=lambda: 0.0, maxchars=100)
    nobody = Identity("p", None, frozenset(), {})
    for i in range(50):
        cache.put(f"{i:030d}", Verified(nobody, "f", 1.0))  # 30 characters each
        assert cache.chars <= 100
    assert len(cache) == 3
    assert cache.get(f"{49:030d}") is not None
    assert cache.get(f"{46:030d}") is None  # the oldest went first
    cache.put("x" * 101, Verified(nobody, "f", 1.0))  # larger than the budget: not kept
    assert len(cache) == 3
    cache.put(f"{49:030d}", Verified(nobody, "f", 1.0))  # the same token again
    assert (len(cache), cache.chars) == (3, 90)
    now = [0.0]
    cache = TokenCache(clock=lambda: now[0], maxchars=100)
    cache.put("t" * 40, Verified(nobody, "f", 5.0))
    now[0] = 5.0
    assert cache.get("t" * 40) is None  # expired at its exp + leeway: dropped, not served
    assert cache.chars == 0


def test_bearer_token_reading() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None
    assert bearer_token("Bearer  ") is None
    assert bearer_token("Bearer \tabc\u3000") == "abc"


@given(st.sampled_from(["Bearer ", "bearer ", " Bearer ", "BEARER  ", "Bearer\t"]), st.text())
@example("Bearer ", " a b ")
@example("Bearer ", "\x85")
def test_bearer_token_fast_spelling_reads_as_the_general_rule(scheme: str, rest: str) -> None:
    value = scheme + rest
    # The rule as first written (RFC 6750 2.1, scheme case-insensitive):
    name, _, token = value.strip().partition(" ")
    expected = (token.strip() or None) if name.lower() == "bearer" else None
    assert bearer_token(value) == expected


# -- gateway check ---------------------------------------------------------------

ROUTE = """
[upstreams.app]
targets = ["http://127.0.0.1:9"]
"""


def _errors(text: str, environ: dict[str, str] | None = None) -> list[str]:
    saved = dict(os.environ)
    try:
        os.environ.pop("GW_SECRET", None)
        os.environ.update(environ or {})
        parse(text)
    except ConfigError as error:
        return error.errors
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return []


def test_check_names_an_unknown_policy_with_its_nearest_name(tmp_path: Path) -> None:
    keys = tmp_path / "k.toml"
    keys.write_text("")
    text = f"""
[auth.partners]
type = "api_key"
keys_file = "{keys}"
{ROUTE}
[[routes]]
name = "r"
path = "/"
upstream = "app"
auth = ["partner"]
"""
    assert _errors(text) == [
        'routes[0] ("r").auth[0]: unknown auth policy "partner" (line 13); did you mean "partners"?'
    ]


def test_check_refuses_hs_without_secret_env_none_and_a_missing_variable() -> None:
    text = """
[auth.a]
type = "jwt"
algorithms = ["HS256", "none"]
[auth.b]
type = "jwt"
algorithms = ["HS384"]
secret_env = "GW_SECRET"
"""
    errors = _errors(text)
    assert any(e.startswith("auth.a.algorithms: HS256/384/512 need secret_env") for e in errors)
    assert any(e.startswith('auth.a.algorithms[1]: "none" is never accepted') for e in errors)
    assert any(
        e.startswith("auth.b.secret_env: environment variable GW_SECRET is not set") for e in errors
    )
    assert (
        _errors(
            text.replace(', "none"', "").replace(
                '"HS256"', '"HS256"]\nsecret_env = "GW_SECRET"\n#'
            ),
            {"GW_SECRET": SECRET},
        )
        == []
    )


def test_check_refuses_unknown_placeholders_bad_cidrs_and_redirect_with_upstream() -> None:
    text = f"""{ROUTE}
[[routes]]
name = "r"
path = "/"
upstream = "app"
redirect = "https://{{host}}{{path}}"
[routes.request_headers]
set = {{ X-C = "{{clientip}}" }}
[routes.access]
allow_ips = ["10.0.0.0/33"]
deny_ips = ["nope"]
"""
    errors = _errors(text)
    assert 'routes[0] ("r").redirect: cannot be set together with upstream (line 9)' in errors
    assert any(
        e.startswith('routes[0] ("r").request_headers.set.X-C: unknown placeholder {clientip}')
        and 'did you mean "{client_ip}"?' in e
        for e in errors
    )
    assert any(e.startswith('routes[0] ("r").access.allow_ips[0]: invalid CIDR') for e in errors)
    assert any(e.startswith('routes[0] ("r").access.deny_ips[0]: invalid CIDR') for e in errors)


def test_check_reads_key_files_and_names_their_problems(tmp_path: Path) -> None:
    jwks_path = tmp_path / "jwks.json"
    jwks_path.write_text('{"keys": [{"kty": "oct", "k": "AA"}]}')
    text = f"""
[auth.a]
type = "jwt"
algorithms = ["RS256"]
jwks_file = "{jwks_path}"
forward_claims = {{ sub = "X_Sub" }}
[auth.b]
type = "api_key"
keys_file = "{tmp_path / "missing.toml"}"
algorithms = ["RS256"]
"""
    errors = _errors(text)
    assert any(e.startswith("auth.a.jwks_file:") and "no usable signature key" in e for e in errors)
    assert any(e.startswith("auth.a.forward_claims.sub: a header name with '_'") for e in errors)
    assert any(e.startswith("auth.b.keys_file: cannot read") for e in errors)
    assert any(e.startswith("auth.b.algorithms: not a key of a api_key policy") for e in errors)


def test_gateway_apikey_prints_a_key_whose_hash_is_the_block(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["apikey", "acme", "--scopes", "orders:read,orders:write"]) == 0
    out = capsys.readouterr().out
    key = out.splitlines()[0].removeprefix("key: ")
    assert len(key) >= 43  # 32 random bytes, base64url
    block = tomllib.loads(out.partition("\n\n")[2])
    entry = block["consumers"]["acme"]
    assert entry["key_sha256"] == hash_key(key)
    assert entry["scopes"] == ["orders:read", "orders:write"]
    consumers, errors = parse_keys_file(out.partition("\n\n")[2])
    assert errors == []
    assert consumers[0].name == "acme"
    assert cli.main(["apikey", "bad name"]) == 2


def test_api_keys_remember_only_keys_that_passed_and_at_most_one_per_consumer() -> None:
    from gateway.core.auth import ApiKeyPolicy
    from gateway.state.auth import ApiKeys

    consumer = Consumer(name="acme", key_sha256=hash_key("secret-key"), scopes=("a",))
    api = ApiKeys(ApiKeyPolicy(name="p", consumers=(consumer,)))
    hostile = ["", "secret-key ", "secret-kez", "x" * 513, "secret-key\r\n", "\x00", "\udcff"]
    for key in [*hostile, *(f"guess-{i}" for i in range(200))]:
        assert api.identity(key) is None
    assert len(api) == 0  # a wrong key is never remembered
    first = api.identity("secret-key")
    assert first is not None
    assert (first.policy, first.consumer, first.scopes) == ("p", "acme", frozenset({"a"}))
    assert api.identity("secret-key") is first  # the second time: remembered
    assert len(api) == 1
    for key in hostile:
        assert api.identity(key) is None
    assert len(api) == 1
