"""`gateway run` / `gateway check` / `gateway --version`: config path, event loop, exit codes.

Exit codes: 0 config valid (`check`) or clean drain after SIGTERM/SIGINT
(`run`); 1 config error, or the gateway cannot start (address in use, bad
LISTEN_FDS); 2 command-line usage error (argparse); 128+N when a second
signal N cut the drain short (130 SIGINT, 143 SIGTERM, see server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import sys
from collections.abc import Sequence
from typing import Final

from gateway import __version__
from gateway.core.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load, summary
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
    print(f"{path}: ok")
    return EXIT_OK


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
    try:
        config = load(path)
    except ConfigError as error:
        log.error(
            "cannot start: %d error(s) in %s:\n  %s",
            len(error.errors),
            path,
            "\n  ".join(error.errors),
        )
        return EXIT_CONFIG
    from gateway.server import Gateway, StartupError

    if config.server.workers != 1:
        return _run_workers(config, loop_choice)

    async def main() -> int:
        gateway = Gateway(config)
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
    path = config_path(args.config)
    if args.command == "check":
        return check(path)
    return run(path, args.loop)
