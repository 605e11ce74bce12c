"""Logging: lifecycle lines through `logging`, the access log straight to a stream.

Two kinds of stderr lines, treated differently on purpose:

- Lifecycle events (start, reload, drain, errors) are rare: the `logging` module under
  the "gateway" logger tree, configured once by `configure_logging()`.
- The access log is one line per request, on the hot path: `AccessLog.write()` builds
  the line itself and writes it with one `write()` call, no `logging` machinery.

Under journald (CONTRACT.md: `$JOURNAL_STREAM` set) no line carries a timestamp, since
the journal stamps every entry itself. Lifecycle lines then start with the sd-daemon(3)
priority prefix ("<3>" error ... "<7>" debug), which journald turns into the entry's
PRIORITY= instead of logging everything at the unit's SyslogLevel=.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Final, TextIO

import msgspec

from gateway.core import systemd
from gateway.core.config import AccessLogFormat

__all__ = [
    "AccessEntry",
    "AccessLog",
    "AccessLogFormat",
    "configure_logging",
    "journald_mode",
    "lifecycle_logger",
]

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNALD_FORMAT: Final = "%(levelname)s %(name)s: %(message)s"


def journald_mode(environ: Mapping[str, str] = os.environ) -> bool:
    """True when stderr lines must carry no timestamp: `$JOURNAL_STREAM` is set.

    CONTRACT.md keys this on the variable alone. (Whether the journal really reads our
    stderr, which decides the "<N>" prefixes, is `systemd.under_journald()`.)
    """
    return bool(environ.get("JOURNAL_STREAM"))


def lifecycle_logger(name: str) -> logging.Logger:
    """The logger for one concern: `gateway.<name>` (STYLE.md)."""
    return logging.getLogger(f"gateway.{name}")


# --- lifecycle logging -----------------------------------------------------------------


def _priority(levelno: int) -> str:
    # sd-daemon(3): SD_CRIT "<2>", SD_ERR "<3>", SD_WARNING "<4>", SD_INFO "<6>",
    # SD_DEBUG "<7>" (Python has no NOTICE level, so "<5>" is never produced).
    if levelno >= logging.CRITICAL:
        return "<2>"
    if levelno >= logging.ERROR:
        return "<3>"
    if levelno >= logging.WARNING:
        return "<4>"
    if levelno >= logging.INFO:
        return "<6>"
    return "<7>"


class _JournaldFormatter(logging.Formatter):
    """Prefixes every line with its priority: journald reads each stream line as its own
    entry, so a traceback's continuation lines would otherwise fall back to SyslogLevel=."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = _priority(record.levelno)
        return prefix + super().format(record).replace("\n", "\n" + prefix)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to the `sys.stderr` of the moment, like `logging.lastResort`, so a handler
    installed while stderr was swapped (pytest capture, a redirect) never writes to a
    closed stream later."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self._follow_stderr = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        if self._follow_stderr:
            self.stream = sys.stderr  # emit() runs under the handler lock (Handler.handle)
        super().emit(record)


_handlers: dict[str, logging.Handler] = {}

# aiohttp's own loggers ("Error handling request", connector trouble) are worth seeing,
# but only from WARNING up: below that they are per-request chatter.
_AIOHTTP_MIN_LEVEL: Final = logging.WARNING


def configure_logging(
    environ: Mapping[str, str] = os.environ,
    level: int = logging.INFO,
    *,
    stream: TextIO | None = None,
) -> None:
    """One stderr handler for the "gateway" logger tree (and aiohttp's, from WARNING).

    Lines are `TEXT_FORMAT`; when `journald_mode(environ)` they lose the timestamp, and
    when stderr really is the journal (`systemd.under_journald`) each line gets its
    sd-daemon(3) priority prefix. `stream` defaults to whatever `sys.stderr` is at each
    write. Calling again replaces the previous handlers (idempotent, never doubles lines).
    Loggers keep propagating, so handlers on the root logger (pytest's caplog) still see
    records; `gateway run` installs none there.
    """
    formatter: logging.Formatter
    if not journald_mode(environ):
        formatter = logging.Formatter(TEXT_FORMAT)
    elif systemd.under_journald(environ):
        formatter = _JournaldFormatter(JOURNALD_FORMAT)
    else:
        formatter = logging.Formatter(JOURNALD_FORMAT)
    for name, handler_level in (("gateway", level), ("aiohttp", max(level, _AIOHTTP_MIN_LEVEL))):
        logger = logging.getLogger(name)
        old = _handlers.pop(name, None)
        if old is not None:
            logger.removeHandler(old)
            old.close()
        handler = _StderrHandler(stream)
        handler.setFormatter(formatter)
        handler.setLevel(handler_level)
        logger.addHandler(handler)
        _handlers[name] = handler
    # Only our own tree's level is ours to set; aiohttp's stays as the application left it
    # (the root's WARNING by default), the handler level above does the filtering.
    logging.getLogger("gateway").setLevel(level)


# --- access log ------------------------------------------------------------------------


class AccessEntry:
    """What one access-log line says about one request, filled in as it runs.

    The proxy's per-request exchange object is one of these (it adds what only
    the proxy needs), so the line is written from the exchange itself; a
    request refused before the handler gets a bare one.

    `cut` says who ended the request before its response was complete (the
    line's `aborted` field): "client" (gone, or stopped reading), "upstream"
    (the target failed after the response began), "drain" (still running at
    `drain_timeout`), "shutdown" (still running at a second SIGTERM/SIGINT).
    `status` is what the client got if a response began; else 499 for
    "client" (nginx's "client closed request") and 503 for "drain" and
    "shutdown" (the gateway ended it, like Envoy's 503 with a response flag).
    `targets` and `upstream_status` have one item per attempt, in order, as
    nginx's `$upstream_addr` and `$upstream_status` lists: None where the
    attempt got no response head.
    """

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "client",
        "consumer",
        "cut",
        "error",
        "interim",
        "method",
        "path",
        "request_id",
        "route",
        "started_at",
        "status",
        "targets",
        "trace_id",
        "upstream_status",
    )

    def __init__(
        self, request_id: str, client: str, method: str, path: str, started_at: float = 0.0
    ) -> None:
        self.request_id = request_id
        self.client = client
        self.method = method
        self.path = path
        self.started_at = started_at  # monotonic
        self.route: str | None = None
        self.status = 0  # 0 until the response is decided
        self.bytes_in = 0
        self.bytes_out = 0  # body bytes, without the head
        self.error: str | None = None
        self.cut: str | None = None
        # Who the request authenticated as (JWT `sub` or API-key consumer).
        self.consumer: str | None = None
        self.targets: list[str] = []
        self.upstream_status: list[int | None] = []
        self.interim = 0  # interim (1xx) responses relayed to the client
        self.trace_id: str | None = None  # W3C trace id (gateway/core/tracing.py)

    def tried(self, target: str) -> None:
        """An attempt on `target` begins (its status is filled in by `answered`)."""
        self.targets.append(target)
        self.upstream_status.append(None)

    def answered(self, status: int) -> None:
        """The current attempt's target sent a response head with `status`."""
        self.upstream_status[-1] = status


class _AccessRecord(msgspec.Struct, kw_only=True):
    """One JSON access-log line; the field order is the key order on the wire."""

    # UNSET is left out of the encoding: under journald the line carries no timestamp.
    ts: str | msgspec.UnsetType = msgspec.UNSET
    request_id: str
    client: str
    method: str
    path: str
    route: str | None
    consumer: str | None
    target: str | None
    status: int
    bytes_in: int
    bytes_out: int
    duration_ms: float
    error: str | None
    aborted: str | None
    attempts: int
    targets: list[str]
    upstream_status: list[int | None]
    interim: int
    # Every proxied request has one; left out of lines for requests refused
    # before they were read (no trace to name).
    trace_id: str | msgspec.UnsetType = msgspec.UNSET


_encode = msgspec.json.Encoder().encode


def _unsurrogate(value: str) -> str:
    # The server decodes the request target with "surrogateescape"; UTF-8 can't carry the
    # resulting lone surrogates, so show the raw bytes as \xNN instead.
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _escape(value: str) -> str:
    """`value` safe inside "..." on one text line: quotes, backslashes and anything
    unprintable (CR, LF, NUL, lone surrogates) are escaped, so a request can't forge a line."""
    if value.isprintable() and '"' not in value and "\\" not in value:
        return value
    return json.dumps(value)[1:-1]


def _bare(value: str | None) -> str:
    """`value` for a key=value field: "-" when absent, JSON-quoted when it has spaces."""
    if value is None:
        return "-"
    if value.isprintable() and " " not in value and '"' not in value and "\\" not in value:
        return value
    return json.dumps(value)


class AccessLog:
    """One line per finished request on `stream` (stderr), as json, text, or nothing.

    json: `{"ts", "request_id", "client", "method", "path", "route", "consumer", "target",
    "status", "bytes_in", "bytes_out", "duration_ms", "error", "aborted", "attempts",
    "targets", "upstream_status", "interim", "trace_id"}` in that order; `route`,
    `consumer`, `target`, `error` and `aborted` are null when absent; `consumer` is who
    authenticated (identity.md); `target` is the last target tried; `interim` counts
    the targets' 1xx responses relayed to the client (`status` is the final one's);
    `trace_id` is left out for requests refused before they were read; `ts` is the
    ISO-8601 UTC time the line was written (the request's end; its start is
    `ts - duration_ms`), left out under journald, whose entry carries the time. See
    `AccessEntry` for the meaning of each.

    text: `[TS ]CLIENT "METHOD PATH" STATUS in=N out=N 7.1ms route=R target=T id=ID
    [ consumer=C][ trace=T][ error=E][ aborted=A][ attempts=N targets=T1,T2
    upstream_status=S1,S2][ interim=N]` with "-"
    for an absent route, target or upstream status; the attempts part only when there was
    a retry, `interim` only when some 1xx was relayed.

    off: `write()` returns at once; callers on the hot path may test `enabled` first to
    skip gathering the arguments.
    """

    __slots__ = ("_clock", "_journald", "_sec", "_sec_text", "_stream", "enabled", "fmt")

    def __init__(
        self,
        fmt: AccessLogFormat,
        stream: TextIO | None = None,
        journald: bool = False,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fmt: AccessLogFormat = fmt
        self.enabled = fmt != "off"
        # Resolved now, not at import: the stderr of the moment the log is built.
        self._stream: TextIO = stream if stream is not None else sys.stderr
        self._journald = journald
        self._clock = clock
        self._sec = -1
        self._sec_text = ""

    def set_format(self, fmt: AccessLogFormat) -> None:
        """Switch format (a reload changed server.access_log); the next line uses it."""
        self.fmt = fmt
        self.enabled = fmt != "off"

    def _timestamp(self) -> str:
        # strftime() only once per second, like nginx's cached time strings
        # (ngx_time_update): within a second only the milliseconds change.
        now = self._clock()
        sec = int(now)
        if sec != self._sec:
            self._sec = sec
            self._sec_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._sec_text}.{int((now - sec) * 1000):03d}Z"

    def write(
        self,
        *,
        request_id: str,
        client: str,
        method: str,
        path: str,
        route: str | None,
        target: str | None,
        status: int,
        bytes_in: int,
        bytes_out: int,
        duration: float,
        error: str | None = None,
    ) -> None:
        """Log one finished request from its fields (one attempt at most); see `record`."""
        if not self.enabled:
            return
        entry = AccessEntry(request_id, client, method, path)
        entry.route = route
        if target is not None:
            entry.tried(target)
        entry.status = status
        entry.bytes_in = bytes_in
        entry.bytes_out = bytes_out
        entry.error = error
        self.record(entry, duration)

    def record(self, entry: AccessEntry, duration: float) -> None:
        """Log one finished request; `duration` is in seconds. Never raises."""
        if not self.enabled:
            return
        targets = entry.targets
        target = targets[-1] if targets else None
        if self.fmt == "json":
            record = _AccessRecord(
                ts=msgspec.UNSET if self._journald else self._timestamp(),
                request_id=entry.request_id,
                client=entry.client,
                method=entry.method,
                path=entry.path,
                route=entry.route,
                consumer=entry.consumer,
                target=target,
                status=entry.status,
                bytes_in=entry.bytes_in,
                bytes_out=entry.bytes_out,
                duration_ms=round(duration * 1000, 3),
                error=entry.error,
                aborted=entry.cut,
                attempts=len(targets),
                targets=targets,
                upstream_status=entry.upstream_status,
                interim=entry.interim,
                trace_id=msgspec.UNSET if entry.trace_id is None else entry.trace_id,
            )
            try:
                data = _encode(record)
            except UnicodeEncodeError:
                for field in (
                    "request_id",
                    "client",
                    "method",
                    "path",
                    "route",
                    "consumer",
                    "target",
                    "error",
                ):
                    value = getattr(record, field)
                    if value is not None:
                        setattr(record, field, _unsurrogate(value))
                record.targets = [_unsurrogate(t) for t in targets]
                data = _encode(record)
            line = data.decode() + "\n"
        else:
            line = (
                f'{_bare(entry.client)} "{_escape(entry.method)} {_escape(entry.path)}" '
                f"{entry.status} in={entry.bytes_in} out={entry.bytes_out} "
                f"{duration * 1000:.1f}ms route={_bare(entry.route)} "
                f"target={_bare(target)} id={_bare(entry.request_id)}"
            )
            if entry.consumer is not None:
                line += f" consumer={_bare(entry.consumer)}"
            if entry.trace_id is not None:
                line += f" trace={entry.trace_id}"  # 32 hex digits: never needs quoting
            if entry.error is not None:
                line += f" error={_bare(entry.error)}"
            if entry.cut is not None:
                line += f" aborted={_bare(entry.cut)}"
            if len(targets) > 1:
                statuses = ",".join("-" if s is None else str(s) for s in entry.upstream_status)
                line += (
                    f" attempts={len(targets)} targets={_bare(','.join(targets))}"
                    f" upstream_status={statuses}"
                )
            if entry.interim:
                line += f" interim={entry.interim}"
            line = f"{line}\n" if self._journald else f"{self._timestamp()} {line}\n"
        try:  # noqa: SIM105 - a bare try costs less than contextlib.suppress per request
            self._stream.write(line)
        except (OSError, ValueError):
            # stderr gone (EPIPE after journald restarted, closed file): there is nowhere
            # left to report it, and a log line must never fail the request it describes.
            pass

    def flush(self) -> None:
        """Push buffered lines out now: the process is about to `os._exit()`."""
        try:  # noqa: SIM105 - as in record()
            self._stream.flush()
        except (OSError, ValueError):
            pass
