"""`[cache]` and `[routes.cache]` in routes.toml: defaults, hostile values, summary."""

from __future__ import annotations

import pytest

from gateway.core.config import CacheConfig, ConfigError, RouteCacheConfig, parse, summary

BASE = """
[upstreams.app]
targets = ["http://127.0.0.1:9000"]

[[routes]]
name = "r"
path = "/"
upstream = "app"
"""


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value.errors


def test_defaults_and_the_summary_line() -> None:
    config = parse("[cache]\n" + BASE + "[routes.cache]\n")
    assert config.cache == CacheConfig()
    assert config.routes[0].cache == RouteCacheConfig(ttl=60.0, stale_if_error=0.0)
    text = summary(config)
    assert "cache      268435456 bytes, entries up to 8388608 bytes" in text
    assert "cache ttl 60s stale_if_error 0s" in text


def test_no_cache_table_means_no_caching() -> None:
    config = parse(BASE)
    assert config.cache is None
    assert config.routes[0].cache is None


def test_a_route_cache_without_the_store_is_an_error() -> None:
    assert _errors(BASE + "[routes.cache]\nttl = 5.0\n") == [
        'routes[0] ("r").cache: needs a top-level [cache] table (the shared store) (line 9)'
    ]


@pytest.mark.parametrize(
    ("cache", "error"),
    [
        ("max_bytes = 0", "cache.max_bytes: must be > 0"),
        ("max_bytes = -5", "cache.max_bytes: must be > 0"),
        ("max_entry_bytes = 0", "cache.max_entry_bytes: must be > 0"),
        ('max_bytes = "1G"', "cache.max_bytes: Expected `int`, got `str`"),
        ("max_bytes = 1.5", "cache.max_bytes: Expected `int`, got `float`"),
        (
            "max_bytes = 10\nmax_entry_bytes = 11",
            "cache.max_entry_bytes: must not be over cache.max_bytes (10)",
        ),
        ("max_byte = 10", "cache.max_byte: unknown key"),
    ],
)
def test_hostile_store_sizes_are_refused_with_their_key(cache: str, error: str) -> None:
    errors = _errors(f"[cache]\n{cache}\n" + BASE)
    assert any(e.startswith(error) for e in errors), errors


@pytest.mark.parametrize(
    ("route_cache", "error"),
    [
        ("ttl = -1.0", 'routes[0] ("r").cache.ttl: must be >= 0'),
        ("ttl = nan", 'routes[0] ("r").cache.ttl: must be a finite number of seconds'),
        ("ttl = inf", 'routes[0] ("r").cache.ttl: must be a finite number of seconds'),
        ("stale_if_error = -0.5", 'routes[0] ("r").cache.stale_if_error: must be >= 0'),
        ('ttl = "60"', 'routes[0] ("r").cache.ttl: Expected `float`, got `str`'),
        ("tll = 5.0", 'routes[0] ("r").cache.tll: unknown key'),
    ],
)
def test_hostile_route_cache_values_are_refused_with_their_key(
    route_cache: str, error: str
) -> None:
    errors = _errors("[cache]\n" + BASE + f"[routes.cache]\n{route_cache}\n")
    assert any(e.startswith(error) for e in errors), errors


def test_a_small_store_takes_its_entry_limit_down_with_it() -> None:
    config = parse("[cache]\nmax_bytes = 1000\n" + BASE)
    assert config.cache == CacheConfig(max_bytes=1000, max_entry_bytes=1000)
