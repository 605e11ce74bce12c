"""`gateway check` / `gateway run` as an operator types them: exit codes, output, config path."""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import pytest

import gateway
from gateway.cli import config_path
from tests.gateway_process import REPO, config_text, run_gateway, run_to_exit

GATEWAY = [sys.executable, "-m", "gateway"]

BROKEN = """
[server]
listen = ["127.0.0.1:0"]
drain_timeout = "soon"
listne = ["127.0.0.1:1"]

[upstreams.users]
balancer = "random"
targets = ["ftp://127.0.0.1:9"]

[[routes]]
name = "users-api"
path = "/api/users"
upstream = "userz"
"""
# Each error names its key (CONTRACT.md "Command line").
BROKEN_KEYS = (
    "server.drain_timeout",
    "server.listne: unknown key",
    "upstreams.users.balancer",
    "upstreams.users.targets[0]",
    'routes[0] ("users-api").upstream: unknown upstream "userz"',
)


def named(route: str) -> str:
    return config_text(f"""
        [upstreams.app]
        targets = ["http://127.0.0.1:9"]

        [[routes]]
        name = "{route}"
        path = "/"
        upstream = "app"
    """)


@pytest.mark.parametrize("shipped", ["routes.toml", "contrib/systemd/routes.toml"])
async def test_check_accepts_the_shipped_examples_with_a_summary(
    tmp_path: Path, shipped: str
) -> None:
    # Only that they pass: their contents are the operator's to edit.
    path = REPO / shipped
    status, out, err = await run_to_exit(tmp_path, [*GATEWAY, "check", "-c", str(path)])
    assert (status, err) == (0, "")
    assert out.startswith(f"config     {path} (sha256 ")
    assert out.endswith(f"{path}: ok\n")
    assert len(out.splitlines()) < 40  # one screen


async def test_check_lists_every_error_by_key_and_exits_1(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text(BROKEN)
    status, out, err = await run_to_exit(tmp_path, [*GATEWAY, "check", "-c", str(broken)])
    assert (status, out) == (1, "")
    lines = err.splitlines()
    for key in BROKEN_KEYS:
        assert any(line.startswith(key) for line in lines), (key, err)
    assert lines[-1] == f"{broken}: {len(BROKEN_KEYS)} error(s)"


async def test_check_shows_the_line_and_a_guess_for_a_typo(tmp_path: Path) -> None:
    typo = tmp_path / "typo.toml"
    typo.write_text(
        "[upstreams.users]\n"
        'targets = ["http://127.0.0.1:9"]\n'
        "\n"
        "[[routes]]\n"
        'name = "users-api"\n'
        'path = "/api/users"\n'
        'methods = ["GTE"]\n'
        'upstream = "users"\n'
    )
    status, out, err = await run_to_exit(tmp_path, [*GATEWAY, "check", "-c", str(typo)])
    assert (status, out) == (1, "")
    assert err.splitlines() == [
        'routes[0] ("users-api").methods[0]: unknown method "GTE" (line 7); did you mean "GET"?',
        f"{typo}: 1 error(s)",
    ]


async def test_run_refuses_to_start_on_a_broken_config(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text(BROKEN)
    status, _, err = await run_to_exit(tmp_path, [*GATEWAY, "run", "-c", str(broken)])
    assert status == 1
    assert f"cannot start: {len(BROKEN_KEYS)} error(s) in {broken}" in err
    for key in BROKEN_KEYS:
        assert key in err


async def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    status, _, err = await run_to_exit(tmp_path, [*GATEWAY, "check", "-c", "nope.toml"])
    assert status == 1
    assert "nope.toml: cannot read: No such file or directory" in err


async def test_an_address_in_use_fails_the_start_with_exit_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = tmp_path / "routes.toml"
        config.write_text(
            named("app").replace(
                'listen = ["127.0.0.1:0"]', f'listen = ["127.0.0.1:{busy.getsockname()[1]}"]'
            )
        )
        status, _, err = await run_to_exit(tmp_path, [*GATEWAY, "run", "-c", str(config)])
    assert status == 1
    assert "cannot start: " in err
    assert "address already in use" in err
    assert "Traceback" not in err


async def test_version_prints_the_package_version_and_exits_0(tmp_path: Path) -> None:
    status, out, err = await run_to_exit(tmp_path, [*GATEWAY, "--version"])
    assert (status, out, err) == (0, f"gateway {gateway.__version__}\n", "")
    assert re.fullmatch(r"gateway [0-9]+\.[0-9]+\.[0-9]+\n", out)


async def test_usage_errors_exit_2(tmp_path: Path) -> None:
    status, _, err = await run_to_exit(tmp_path, [*GATEWAY, "serve"])
    assert status == 2
    assert "invalid choice" in err


async def test_config_path_precedence_flag_then_environment_then_cwd(tmp_path: Path) -> None:
    (tmp_path / "routes.toml").write_text(named("from-cwd"))
    (tmp_path / "env.toml").write_text(named("from-env"))
    (tmp_path / "flag.toml").write_text(named("from-flag"))
    env = {"GATEWAY_CONFIG": str(tmp_path / "env.toml")}
    cases = [
        ([], {}, "from-cwd"),
        ([], env, "from-env"),
        (["-c", "flag.toml"], env, "from-flag"),
    ]
    for args, environ, route in cases:
        status, out, _ = await run_to_exit(tmp_path, [*GATEWAY, "check", *args], env=environ)
        assert status == 0
        assert f"  {route}: path / -> app" in out, (args, environ, out)


async def test_run_takes_the_same_path_as_check(tmp_path: Path) -> None:
    # $GATEWAY_CONFIG beats ./routes.toml: a broken file there stops `run`...
    (tmp_path / "broken.toml").write_text(BROKEN)
    environ = {"GATEWAY_CONFIG": str(tmp_path / "broken.toml")}
    status, _, err = await run_to_exit(tmp_path, [*GATEWAY, "run"], env=environ)
    assert status == 1
    assert "broken.toml" in err
    # ...and without it, `run` serves ./routes.toml from its working directory.
    async with run_gateway(tmp_path, named("from-cwd"), argv=[*GATEWAY, "run"]) as gw:
        assert "1 routes, 1 upstreams from routes.toml" in gw.stderr()


@pytest.mark.parametrize(
    ("flag", "environ", "expected"),
    [
        ("a.toml", {"GATEWAY_CONFIG": "b.toml"}, "a.toml"),
        (None, {"GATEWAY_CONFIG": "b.toml"}, "b.toml"),
        (None, {"GATEWAY_CONFIG": ""}, "routes.toml"),
        (None, {}, "routes.toml"),
    ],
)
def test_config_path(
    monkeypatch: pytest.MonkeyPatch, flag: str | None, environ: dict[str, str], expected: str
) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert config_path(flag) == expected
