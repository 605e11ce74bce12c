"""gateway.log: the access-log line formats and journald-aware lifecycle logging."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.state import log
from gateway.state.log import AccessEntry, AccessLog, configure_logging

REPO = Path(__file__).resolve().parents[1]

NOW = 1_700_000_000.1234  # 2023-11-14T22:13:20.123Z
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d")

REQUEST: dict[str, Any] = {
    "request_id": "abc",
    "client": "127.0.0.1",
    "method": "GET",
    "path": "/api/users/7?x=1",
    "route": "users",
    "target": "http://127.0.0.1:9001",
    "status": 200,
    "bytes_in": 0,
    "bytes_out": 12,
    "duration": 0.0071234,
}


def _line(fmt: log.AccessLogFormat, journald: bool = False, **changes: Any) -> str:
    stream = io.StringIO()
    AccessLog(fmt, stream, journald, clock=lambda: NOW).write(**{**REQUEST, **changes})
    return stream.getvalue()


# --- access log -----------------------------------------------------------------------


def test_json_line_has_every_key_in_order() -> None:
    line = _line("json")
    assert line.endswith("\n")
    assert line.count("\n") == 1
    assert json.loads(line) == {
        "ts": "2023-11-14T22:13:20.123Z",
        "request_id": "abc",
        "client": "127.0.0.1",
        "method": "GET",
        "path": "/api/users/7?x=1",
        "route": "users",
        "consumer": None,
        "target": "http://127.0.0.1:9001",
        "status": 200,
        "bytes_in": 0,
        "bytes_out": 12,
        "duration_ms": 7.123,
        "error": None,
        "aborted": None,
        "attempts": 1,
        "targets": ["http://127.0.0.1:9001"],
        "upstream_status": [None],
        "interim": 0,
    }
    assert list(json.loads(line)) == [
        "ts", "request_id", "client", "method", "path", "route", "consumer",
        "target", "status", "bytes_in", "bytes_out", "duration_ms", "error",
        "aborted", "attempts", "targets", "upstream_status", "interim",
    ]  # fmt: skip


def _retried_entry() -> AccessEntry:
    entry = AccessEntry("abc", "127.0.0.1", "GET", "/x", started_at=3.0)
    entry.route = "users"
    entry.tried("http://10.0.0.1:9001")
    entry.tried("http://10.0.0.2:9001")
    entry.answered(200)
    entry.status = 200
    entry.bytes_out = 5
    return entry


def test_json_line_shows_every_attempt_with_its_target_and_status() -> None:
    stream = io.StringIO()
    AccessLog("json", stream, clock=lambda: NOW).record(_retried_entry(), 0.002)
    record = json.loads(stream.getvalue())
    assert record["target"] == "http://10.0.0.2:9001"  # the one that answered
    assert record["attempts"] == 2
    assert record["targets"] == ["http://10.0.0.1:9001", "http://10.0.0.2:9001"]
    assert record["upstream_status"] == [None, 200]  # the first got no response head
    assert record["aborted"] is None


def test_text_line_shows_retries_and_who_cut_the_request() -> None:
    entry = _retried_entry()
    entry.cut = "drain"
    stream = io.StringIO()
    AccessLog("text", stream, journald=True).record(entry, 0.002)
    assert stream.getvalue() == (
        '127.0.0.1 "GET /x" 200 in=0 out=5 2.0ms route=users target=http://10.0.0.2:9001 '
        "id=abc aborted=drain attempts=2 targets=http://10.0.0.1:9001,http://10.0.0.2:9001 "
        "upstream_status=-,200\n"
    )


def test_relayed_interim_responses_are_counted_beside_the_final_status() -> None:
    entry = _retried_entry()
    entry.interim = 3
    stream = io.StringIO()
    AccessLog("json", stream, journald=True).record(entry, 0.002)
    record = json.loads(stream.getvalue())
    assert (record["status"], record["interim"]) == (200, 3)
    stream = io.StringIO()
    AccessLog("text", stream, journald=True).record(entry, 0.002)
    assert stream.getvalue().endswith(" upstream_status=-,200 interim=3\n")


def test_text_line_leaves_out_a_zero_interim_count() -> None:
    assert "interim" not in _line("text")


def test_a_request_without_attempts_logs_empty_lists() -> None:
    stream = io.StringIO()
    entry = AccessEntry("r", "::1", "GET", "/")
    entry.status, entry.error = 404, "no_route"
    AccessLog("json", stream, journald=True).record(entry, 0.0)
    record = json.loads(stream.getvalue())
    assert (record["target"], record["attempts"], record["targets"]) == (None, 0, [])
    assert record["upstream_status"] == []


def test_json_line_under_journald_has_no_timestamp() -> None:
    record = json.loads(_line("json", journald=True, route=None, target=None, error="no_route"))
    assert "ts" not in record
    assert record["route"] is None
    assert record["target"] is None
    assert record["error"] == "no_route"


def test_json_survives_undecodable_path_bytes() -> None:
    # aiohttp decodes the raw target with surrogateescape; b"\xff" arrives as "\udcff".
    record = json.loads(_line("json", path="/a\udcffb"))
    assert record["path"] == "/a\\xffb"


def test_text_line() -> None:
    assert _line("text") == (
        '2023-11-14T22:13:20.123Z 127.0.0.1 "GET /api/users/7?x=1" 200 in=0 out=12 7.1ms '
        "route=users target=http://127.0.0.1:9001 id=abc\n"
    )


def test_text_line_under_journald_has_no_timestamp_and_dashes_for_absent_fields() -> None:
    line = _line("text", journald=True, route=None, target=None, status=404, error="no_route")
    assert line == (
        '127.0.0.1 "GET /api/users/7?x=1" 404 in=0 out=12 7.1ms route=- target=- id=abc '
        "error=no_route\n"
    )
    assert not TIMESTAMP.search(line)


def test_text_line_cannot_be_split_or_forged_by_the_request() -> None:
    line = _line("text", path='/x"\r\n1.2.3.4 "GET /admin', error="connect failed: reset")
    assert line.count("\n") == 1
    assert '"GET /x\\"\\r\\n1.2.3.4 \\"GET /admin"' in line
    assert line.endswith(' error="connect failed: reset"\n')


def test_off_writes_nothing() -> None:
    stream = io.StringIO()
    access = AccessLog("off", stream)
    assert not access.enabled
    access.write(**REQUEST)
    assert stream.getvalue() == ""


def test_set_format_switches_at_the_next_line() -> None:
    stream = io.StringIO()
    access = AccessLog("off", stream, journald=True)
    access.write(**REQUEST)
    access.set_format("json")
    assert access.enabled
    access.write(**REQUEST)
    access.set_format("off")
    access.write(**REQUEST)
    assert json.loads(stream.getvalue())["request_id"] == "abc"


class _CountingStream(io.StringIO):
    writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_one_write_call_per_line(fmt: log.AccessLogFormat) -> None:
    stream = _CountingStream()
    access = AccessLog(fmt, stream)
    for _ in range(3):
        access.write(**REQUEST, error="x y")
    assert stream.writes == 3
    assert stream.getvalue().count("\n") == 3


def test_timestamp_is_recomputed_across_seconds() -> None:
    now = [NOW]
    stream = io.StringIO()
    access = AccessLog("json", stream, clock=lambda: now[0])
    access.write(**REQUEST)
    now[0] = NOW + 1.5
    access.write(**REQUEST)
    first, second = (json.loads(line)["ts"] for line in stream.getvalue().splitlines())
    assert (first, second) == ("2023-11-14T22:13:20.123Z", "2023-11-14T22:13:21.623Z")


def test_a_dead_stream_never_fails_the_request() -> None:
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError

    AccessLog("json", Broken()).write(**REQUEST)
    closed = io.StringIO()
    closed.close()
    AccessLog("text", closed).write(**REQUEST)


# --- lifecycle logging ----------------------------------------------------------------


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """configure_logging() changes process-wide loggers: put them back afterwards."""
    monkeypatch.setattr(log, "_handlers", {})
    saved = {
        name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level)
        for name in ("gateway", "aiohttp")
    }
    yield
    for name, (handlers, level) in saved.items():
        logger = logging.getLogger(name)
        for handler in logger.handlers[:]:
            if handler not in handlers:
                logger.removeHandler(handler)
                handler.close()
        logger.setLevel(level)


def _journal_of_stderr() -> dict[str, str]:
    st = os.fstat(2)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


@pytest.mark.usefixtures("restore_logging")
def test_lifecycle_lines_carry_a_timestamp_outside_journald() -> None:
    stream = io.StringIO()
    configure_logging({}, stream=stream)
    log.lifecycle_logger("test").info("listening on %s", "127.0.0.1:8080")
    stamp, _, rest = stream.getvalue().partition(" INFO ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", stamp)
    assert rest == "gateway.test: listening on 127.0.0.1:8080\n"


@pytest.mark.usefixtures("restore_logging")
def test_under_journald_lines_have_priority_prefixes_and_no_timestamp() -> None:
    stream = io.StringIO()
    configure_logging(_journal_of_stderr(), level=logging.DEBUG, stream=stream)
    logger = log.lifecycle_logger("test")
    logger.debug("probe")
    logger.info("ready")
    logger.warning("slow")
    logger.error("bad")
    logger.critical("worse")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("reload failed")
    lines = stream.getvalue().splitlines()
    assert lines[:5] == [
        "<7>DEBUG gateway.test: probe",
        "<6>INFO gateway.test: ready",
        "<4>WARNING gateway.test: slow",
        "<3>ERROR gateway.test: bad",
        "<2>CRITICAL gateway.test: worse",
    ]
    assert lines[5] == "<3>ERROR gateway.test: reload failed"
    # journald makes each line its own entry: the traceback keeps the error priority.
    assert len(lines) > 6
    assert all(line.startswith("<3>") for line in lines[6:])
    assert not any(TIMESTAMP.search(line) for line in lines)


@pytest.mark.usefixtures("restore_logging")
def test_journal_stream_of_another_fd_drops_timestamps_but_not_into_prefixes() -> None:
    # JOURNAL_STREAM inherited by a process whose stderr went elsewhere: the contract
    # still wants no timestamps, but "<6>" would be noise where no journald parses it.
    stream = io.StringIO()
    configure_logging({"JOURNAL_STREAM": "1:1"}, stream=stream)
    log.lifecycle_logger("test").info("ready")
    assert stream.getvalue() == "INFO gateway.test: ready\n"


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_twice_does_not_double_lines() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging({}, stream=first)
    configure_logging(_journal_of_stderr(), stream=second)
    log.lifecycle_logger("test").info("once")
    assert first.getvalue() == ""
    assert second.getvalue() == "<6>INFO gateway.test: once\n"
    assert len(logging.getLogger("gateway").handlers) == 1


@pytest.mark.usefixtures("restore_logging")
def test_aiohttp_warnings_share_the_handler_but_not_its_info_chatter() -> None:
    stream = io.StringIO()
    configure_logging({}, stream=stream)
    aiohttp_logger = logging.getLogger("aiohttp.server")
    aiohttp_logger.info("chatter")
    aiohttp_logger.error("Error handling request")
    assert "chatter" not in stream.getvalue()
    assert "ERROR aiohttp.server: Error handling request" in stream.getvalue()


def test_real_journal_stream_in_a_subprocess(tmp_path: Path) -> None:
    # As under systemd: stderr is a file whose device:inode is in JOURNAL_STREAM.
    script = (
        "import logging; from gateway.state.log import configure_logging, AccessLog;"
        "configure_logging(); logging.getLogger('gateway.server').info('listening');"
        "AccessLog('text', journald=True).write(request_id='r', client='::1', method='GET',"
        " path='/', route=None, target=None, status=404, bytes_in=0, bytes_out=9,"
        " duration=0.0002, error='no_route')"
    )
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "w") as stderr:
        st = os.fstat(stderr.fileno())
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        subprocess.run(
            [sys.executable, "-c", script], stderr=stderr, env=env, timeout=30, check=True
        )
    assert stderr_path.read_text().splitlines() == [
        "<6>INFO gateway.server: listening",
        '::1 "GET /" 404 in=0 out=9 0.2ms route=- target=- id=r error=no_route',
    ]
