"""`gateway run` / `gateway check` / `gateway --version`: config path, event loop, exit codes.

Exit codes: 0 config valid (`check`) or clean drain after SIGTERM/SIGINT
(`run`); 1 config error, or the gateway cannot start (address in use, bad
LISTEN_FDS); 2 command-line usage error (argparse); 128+N when a second
signal N cut the drain short (130 SIGINT, 143 SIGTERM, see server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import json
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from typing import Final

from gateway import __version__
from gateway.core.auth import CONSUMER_NAME, hash_key, sendable
from gateway.core.config import DEFAULT_CONFIG_PATH, Config, ConfigError, RouteConfig, load, summary
from gateway.core.routing import shadowed_routes
from gateway.state.log import configure_logging

log = logging.getLogger("gateway.cli")

EXIT_OK: Final = 0
EXIT_CONFIG: Final = 1
EXIT_USAGE: Final = 2


def config_path(explicit: str | None) -> str:
    """-c PATH, then $GATEWAY_CONFIG, then ./routes.toml (the contract's order)."""
    return explicit or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH


def version() -> str:
    """The installed distribution's version; the package's own when run from a checkout."""
    try:
        return importlib.metadata.version("gateway")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Streaming HTTP API gateway.")
    parser.add_argument("--version", action="version", version=f"gateway {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "serve"), ("check", "validate the config only")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("-c", "--config", metavar="PATH", help="routes.toml to use")
    apikey = sub.add_parser("apikey", help="print a new API key and its [consumers.NAME] block")
    apikey.add_argument("name", help="the consumer's name (A-Z a-z 0-9 . _ : @ -)")
    apikey.add_argument("--scopes", default="", help="comma-separated scopes, e.g. a,b")
    sub.choices["run"].add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default=os.environ.get("GATEWAY_LOOP", "auto"),
        help="event loop: uvloop when installed (auto), or asyncio's default",
    )
    return parser


def check(path: str) -> int:
    try:
        config = load(path)
    except ConfigError as error:
        for line in error.errors:
            print(line, file=sys.stderr)
        print(f"{path}: {len(error.errors)} error(s)", file=sys.stderr)
        return EXIT_CONFIG
    print(summary(config))
    # Warnings, not errors (nginx -t reports a duplicate location as an
    # error; here a shadowed route is legal and served, it just never wins).
    warnings = [
        f"warning: {_route_ref(route)}: never matches: {_route_ref(winner)} comes first and "
        + ("has the same match rules" if _same_rules(route, winner) else "matches all it does")
        for route, winner in shadowed_routes(config.routes)
    ]
    for line in warnings:
        print(line, file=sys.stderr)
    print(f"{path}: ok" + (f", {len(warnings)} warning(s)" if warnings else ""))
    return EXIT_OK


def apikey(name: str, scopes: str) -> int:
    """A new random key (256 bits, URL-safe), printed once, and the block to
    paste into the keys file: only the key's SHA-256 is ever stored."""
    if not CONSUMER_NAME.fullmatch(name):
        print(
            f"gateway apikey: bad name {name!r}: use 1-128 of A-Z a-z 0-9 . _ : @ -",
            file=sys.stderr,
        )
        return EXIT_USAGE
    wanted = [scope.strip() for scope in scopes.split(",") if scope.strip()]
    if any(
        not sendable(scope) or " " in scope or '"' in scope or "\\" in scope for scope in wanted
    ):
        print("gateway apikey: a scope is one word", file=sys.stderr)
        return EXIT_USAGE
    key = secrets.token_urlsafe(32)
    print(f"key: {key}")
    print("(shown once; give it to the consumer, keep only the block below)")
    print()
    print(
        f"[consumers.{json.dumps(name)}]"
        if "." in name or ":" in name or "@" in name
        else f"[consumers.{name}]"
    )
    print(f'key_sha256 = "{hash_key(key)}"')
    print("scopes = [" + ", ".join(json.dumps(scope) for scope in wanted) + "]")
    return EXIT_OK


def _route_ref(route: RouteConfig) -> str:
    # The key path errors use: `routes[2] ("users-api")`.
    return f"routes[{route.index}] ({json.dumps(route.name, ensure_ascii=False)})"


def _same_rules(a: RouteConfig, b: RouteConfig) -> bool:
    def rules(r: RouteConfig) -> tuple[object, ...]:
        return (r.host, r.path, r.path_regex, r.methods and set(r.methods), set(r.headers))

    return rules(a) == rules(b)


def _loop_factory(choice: str) -> type[asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    loop_class: type[asyncio.AbstractEventLoop] = uvloop.Loop
    return loop_class


def run(path: str, loop_choice: str) -> int:
    configure_logging()
    # As during a reload (gc_paused in state/snapshot.py): no cyclic
    # collection while the config's 10^5 objects are made (they hold no
    # cycles; refcounting frees the parse tree), then they are frozen out
    # of later collections' sight.
    gc.disable()
    try:
        config = load(path)
    except ConfigError as error:
        gc.enable()
        log.error(
            "cannot start: %d error(s) in %s:\n  %s",
            len(error.errors),
            path,
            "\n  ".join(error.errors),
        )
        return EXIT_CONFIG
    gc.freeze()
    gc.enable()
    from gateway.server import Gateway, StartupError

    if config.server.workers != 1:
        return _run_workers(config, loop_choice)
    # Handed over, not kept here: after the first reload nothing may hold
    # the first config (at 120,000 routes, tens of MiB).
    initial = [config]
    del config

    async def main() -> int:
        gateway = Gateway(initial.pop())
        try:
            return await gateway.serve()
        except (OSError, StartupError) as error:  # e.g. address in use
            log.error("cannot start: %s", error)
            gateway.notifier.status(f"cannot start: {error}")
            await gateway.close()
            return EXIT_CONFIG

    factory = _loop_factory(loop_choice)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def _run_workers(config: Config, loop_choice: str) -> int:
    """`workers != 1`: this process is the main one (gateway/supervisor.py)."""
    from gateway.server import StartupError
    from gateway.supervisor import Supervisor

    async def main() -> int:
        supervisor = Supervisor(config)
        try:
            return await supervisor.serve()
        except (OSError, StartupError, ConfigError, TimeoutError) as error:
            log.error("cannot start: %s", error)
            supervisor.notifier.status(f"cannot start: {error}")
            await supervisor.close()
            return EXIT_CONFIG

    factory = _loop_factory(loop_choice)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "apikey":
        return apikey(args.name, args.scopes)
    path = config_path(args.config)
    if args.command == "check":
        return check(path)
    return run(path, args.loop)
