"""RFC 9111 freshness arithmetic and storage rules (core/cacherules.py),
with hypothesis against the RFC's own formulas and pinned examples."""

from __future__ import annotations

import email.utils
import math

from hypothesis import example, given
from hypothesis import strategies as st

from gateway.core import cacherules as rules

NOW = 1_800_000_000.0  # a wall-clock instant, whole seconds
deltas = st.integers(min_value=0, max_value=2**32)


def _date(wall: float) -> str:
    return email.utils.formatdate(wall, usegmt=True)


@given(s_maxage=deltas, max_age=deltas, ttl=st.floats(0, 1e6))
def test_s_maxage_wins_over_max_age_and_ttl(s_maxage: int, max_age: int, ttl: float) -> None:
    directives = {"s-maxage": str(s_maxage), "max-age": str(max_age)}
    lifetime = rules.freshness_lifetime(directives, _date(NOW + 5), NOW, NOW, ttl)
    assert lifetime == min(s_maxage, rules.MAX_DELTA)


@given(max_age=deltas, expires_in=st.integers(-(10**6), 10**6), ttl=st.floats(0, 1e6))
def test_max_age_wins_over_expires(max_age: int, expires_in: int, ttl: float) -> None:
    lifetime = rules.freshness_lifetime(
        {"max-age": str(max_age)}, _date(NOW + expires_in), NOW, NOW, ttl
    )
    assert lifetime == min(max_age, rules.MAX_DELTA)


@given(
    expires_in=st.integers(-(10**8), 10**8),
    date_skew=st.integers(-1000, 1000),
    ttl=st.floats(0, 1e6),
)
@example(expires_in=-1, date_skew=0, ttl=60.0)  # expired Expires: stale, not ttl
def test_expires_minus_date_then_ttl(expires_in: int, date_skew: int, ttl: float) -> None:
    date = NOW + date_skew
    lifetime = rules.freshness_lifetime({}, _date(date + expires_in), date, NOW, ttl)
    assert lifetime == max(0, expires_in)
    assert rules.freshness_lifetime({}, None, date, NOW, ttl) == ttl


@given(value=st.text(max_size=12))
@example(value="0")
@example(value="Thu, 01 Jan 1970 00:00:00 GMT")
@example(value="-1")
def test_an_invalid_expires_means_already_expired(value: str) -> None:
    # RFC 9111 5.3: an invalid date, "0" above all, is in the past.
    if rules.http_date(value) is None:
        assert rules.freshness_lifetime({}, value, NOW, NOW, 60.0) == 0.0


@given(arg=st.text(max_size=8))
@example(arg="-5")
@example(arg="1e3")
@example(arg="٣")  # a non-ASCII digit is no delta-seconds
def test_an_invalid_max_age_is_stale_not_ttl(arg: str) -> None:
    lifetime = rules.freshness_lifetime({"max-age": arg}, None, NOW, NOW, 60.0)
    if arg.isascii() and arg.isdigit():
        assert lifetime == min(int(arg), rules.MAX_DELTA)
    else:
        assert lifetime == 0.0


def test_no_cache_stores_but_is_never_fresh() -> None:
    assert rules.freshness_lifetime({"no-cache": None, "max-age": "60"}, None, NOW, NOW, 9) == 0.0


@given(
    age_header=st.one_of(st.none(), deltas.map(str)),
    date_offset=st.one_of(st.none(), st.integers(-(10**6), 10**6)),
    delay=st.floats(0, 100),
    resident=st.floats(0, 10**6),
    fraction=st.floats(0, 0.999),
)
def test_current_age_follows_rfc_9111_4_2_3(
    age_header: str | None,
    date_offset: int | None,
    delay: float,
    resident: float,
    fraction: float,
) -> None:
    response_wall = NOW + fraction
    request_wall = response_wall - delay
    date_wall = None if date_offset is None else NOW - date_offset
    initial = rules.initial_age(age_header, date_wall, request_wall, response_wall)
    # The RFC's formulas, with HTTP-date's whole seconds on both sides.
    apparent = 0.0 if date_wall is None else max(0.0, math.floor(response_wall) - date_wall)
    age_value = 0 if age_header is None else min(int(age_header), rules.MAX_DELTA)
    corrected = age_value + (response_wall - request_wall)
    assert math.isclose(initial, max(apparent, corrected), abs_tol=1e-6)
    assert initial >= 0
    age = rules.current_age(initial, 100.0, 100.0 + resident)
    assert math.isclose(age, initial + resident, abs_tol=1e-6)
    # Never younger than what the Age header said.
    assert age + 1e-6 >= age_value


@given(lifetime=st.floats(0, 1e7), age=st.floats(0, 1e7))
def test_fresh_exactly_while_lifetime_exceeds_age(lifetime: float, age: float) -> None:
    assert rules.is_fresh(lifetime, age) == (lifetime > age)


@given(
    status=st.integers(100, 599),
    directives=st.sets(st.sampled_from(["no-store", "private", "public", "s-maxage", "max-age"])),
    cookie=st.booleans(),
    vary_star=st.booleans(),
    auth_route=st.booleans(),
    authorization=st.booleans(),
)
def test_what_is_stored(
    status: int,
    directives: set[str],
    cookie: bool,
    vary_star: bool,
    auth_route: bool,
    authorization: bool,
) -> None:
    parsed: dict[str, str | None] = {name: "10" for name in directives}
    refusal = rules.refusal(
        status,
        parsed,
        cookie,
        ["Accept, *"] if vary_star else ["Accept"],
        shared_only=auth_route,
        authorization=authorization,
    )
    shared = bool(directives & {"public", "s-maxage"})
    stored = (
        status in {200, 203, 204, 301, 308, 404, 410}
        and not directives & {"no-store", "private"}
        and not cookie
        and not vary_star
        and (shared or not (auth_route or authorization))
    )
    assert (refusal is None) == stored


def test_cache_control_parsing() -> None:
    parsed = rules.parse_cache_control(
        ['Max-Age=5, no-cache="Set-Cookie, X", PRIVATE', "max-age=9"]
    )
    assert parsed == {"max-age": "5", "no-cache": "Set-Cookie, X", "private": None}


@given(etag=st.from_regex(r'(W/)?"[a-z0-9]{0,6}"', fullmatch=True))
def test_if_none_match_uses_the_weak_comparison(etag: str) -> None:
    strong = etag.removeprefix("W/")
    assert rules.not_modified(f'"zzz", W/{strong}', None, etag, None)
    assert rules.not_modified("*", None, etag, None)
    assert not rules.not_modified('"other-tag"', None, etag, None)
    # If-None-Match present: If-Modified-Since is not looked at (RFC 9110 13.2.2).
    date = _date(NOW)
    assert not rules.not_modified('"other-tag"', date, etag, date)


def test_if_modified_since() -> None:
    assert rules.not_modified(None, _date(NOW), None, _date(NOW - 10))
    assert not rules.not_modified(None, _date(NOW - 20), None, _date(NOW - 10))
    assert not rules.not_modified(None, "garbage", None, _date(NOW))
    assert not rules.not_modified(None, None, '"a"', _date(NOW))


def test_stale_if_error_is_forbidden_by_must_revalidate() -> None:
    assert rules.stale_if_error_window({"must-revalidate": None}, 30.0) == 0.0
    assert rules.stale_if_error_window({"stale-if-error": "90"}, 30.0) == 90.0
    assert rules.stale_if_error_window({}, 30.0) == 30.0


def test_vary_fields_are_normalised() -> None:
    assert rules.vary_fields(["Accept-Language,  accept", "ACCEPT"]) == (
        "accept",
        "accept-language",
    )
    assert rules.normalise_field(["a,  b", " c"]) == "a, b,c"
