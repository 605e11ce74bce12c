"""The three things systemd hands a service: a notify socket, a watchdog, listening sockets.

Stdlib only, no asyncio: each call is one syscall or a few, cheap enough for the event loop.

- `Notifier`: sd_notify(3) state lines (READY=1, RELOADING=1, STOPPING=1, STATUS=,
  WATCHDOG=1) as datagrams to `$NOTIFY_SOCKET`.
- `watchdog_interval()`: how often to send WATCHDOG=1, from sd_watchdog_enabled(3).
- `listen_fds()` / `socket_from_fd()`: socket activation, from sd_listen_fds(3).
- `under_journald()`: whether stderr is the journal, from systemd.exec(5) $JOURNAL_STREAM.

Outside systemd every one of these is a harmless no-op, so callers never branch on
"are we under systemd".
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Final, Self

__all__ = [
    "SD_LISTEN_FDS_START",
    "Notifier",
    "listen_fds",
    "socket_from_fd",
    "under_journald",
    "watchdog_interval",
]

log = logging.getLogger("gateway.systemd")

# sd_listen_fds(3): passed sockets always start right after stdin/stdout/stderr.
SD_LISTEN_FDS_START: Final = 3

# A blocking send to a stalled service manager would freeze the event loop; dropping the
# datagram would instead leave READY=1 unsent and fail the start after TimeoutStartSec=.
# PID 1 reads its notify socket promptly (and gives it a large receive buffer), so a
# bounded wait is the better trade.
_SEND_TIMEOUT: Final = 1.0


class Notifier:
    """sd_notify(3) for one process: state lines sent to the service manager.

    Each `send()` is one datagram; systemd reads a datagram as one notification, so
    assignments that must be seen together (RELOADING=1 with MONOTONIC_USEC=) are passed
    in the same call. Failures never propagate: the gateway keeps serving if systemd
    went away (e.g. `systemctl daemon-reexec` in progress); the first one is logged as a
    warning, later ones only at debug level so a dead socket can't flood the log.
    """

    __slots__ = ("_address", "_sock", "_warned", "enabled")

    def __init__(self, address: str | None) -> None:
        self.enabled = False
        self._sock: socket.socket | None = None
        self._warned = False
        self._address = ""
        if not address:
            return
        # sd_notify(3): "/..." is a filesystem socket, "@..." one in the Linux abstract
        # namespace. Other forms (systemd >= 253 "vsock:CID:PORT") are not AF_UNIX.
        if address[0] == "@":
            self._address = "\0" + address[1:]
        elif address[0] == "/":
            self._address = address
        else:
            log.warning("NOTIFY_SOCKET=%r is not a supported address, not notifying", address)
            return
        try:
            # Not connect()ed: sendto() resolves the path on every message, so a socket
            # that systemd recreated at the same path (daemon-reexec) keeps working,
            # as libsystemd's sd_notify() does by opening a fresh socket per call.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except OSError as exc:
            log.warning("cannot create a socket for NOTIFY_SOCKET, not notifying: %s", exc)
            return
        sock.settimeout(_SEND_TIMEOUT)
        self._sock = sock
        self.enabled = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Self:
        """A notifier for `$NOTIFY_SOCKET`; disabled (every call a no-op) when unset."""
        return cls(environ.get("NOTIFY_SOCKET"))

    def send(self, *lines: str) -> None:
        """Send `lines` ("KEY=value" each) joined by newlines as ONE datagram."""
        sock = self._sock
        if sock is None or not lines:
            return
        try:
            sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            if self._warned:
                log.debug("sd_notify %r failed: %s", lines, exc)
            else:
                self._warned = True
                log.warning(
                    "sd_notify to the service manager failed (ignored from now on): %s", exc
                )

    def ready(self, status: str | None = None) -> None:
        """Start-up or a reload finished: READY=1 (sd_notify(3))."""
        self.send("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> None:
        """A reload starts: RELOADING=1 and MONOTONIC_USEC= in the same datagram.

        sd_notify(3): MONOTONIC_USEC= lets the service manager tell this reload from an
        earlier one (systemd.service(5), Type=notify-reload); without it `systemctl reload`
        may return before the reload is done. Must be followed by `ready()`, even when the
        reload failed, or the unit stays in "reloading".
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> None:
        """Shutdown (draining) has begun: STOPPING=1 (sd_notify(3))."""
        self.send("STOPPING=1", *_status(status))

    def status(self, text: str) -> None:
        """A one-line human status, shown by `systemctl status` (STATUS=, sd_notify(3))."""
        self.send(*_status(text))

    def watchdog(self) -> None:
        """Still alive: WATCHDOG=1, due every `watchdog_interval()` seconds."""
        self.send("WATCHDOG=1")

    def close(self) -> None:
        """Release the socket; later calls are no-ops. Idempotent."""
        sock, self._sock = self._sock, None
        self.enabled = False
        if sock is not None:
            sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _status(text: str | None) -> tuple[str, ...]:
    # A newline inside STATUS= would start a new assignment in the datagram (sd_notify(3)
    # parses it line by line), so flatten it.
    if text is None:
        return ()
    return ("STATUS=" + " ".join(text.splitlines()),)


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when no watchdog is configured.

    sd_watchdog_enabled(3): WatchdogSec= reaches the service as $WATCHDOG_USEC, meant for
    $WATCHDOG_PID only (when set), and "it is recommended that a daemon sends a keep-alive
    notification message to the service manager every half of the time returned here".
    """
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = environ.get("WATCHDOG_PID")
    try:
        usec = int(raw)
        if pid and int(pid) != os.getpid():
            return None  # inherited from the parent the watchdog is really for
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", raw, pid)
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000


def listen_fds(
    environ: Mapping[str, str] = os.environ, unset: bool = True
) -> list[tuple[int, str]]:
    """Sockets passed by socket activation, as `(fd, name)` pairs; [] when there are none.

    sd_listen_fds(3) and sd_listen_fds_with_names(3): only when $LISTEN_PID is this
    process, fds SD_LISTEN_FDS_START .. SD_LISTEN_FDS_START+$LISTEN_FDS-1, named by the
    colon-separated $LISTEN_FDNAMES (FileDescriptorName= in the .socket unit; "unknown"
    where a name is missing, as systemd itself reports unnamed fds). Each fd gets
    FD_CLOEXEC so a child process can't keep our listeners open.

    With `unset`, LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES are removed from `os.environ` (in
    every case, as sd_listen_fds() does) so children don't believe the fds are theirs.

    Raises ValueError on a malformed $LISTEN_FDS meant for this process (where
    sd_listen_fds() returns -EINVAL), OSError if one of its fds is not open: silently
    falling back to `server.listen` would bind other ports than the socket units name.
    """
    try:
        pid = environ.get("LISTEN_PID", "")
        count = environ.get("LISTEN_FDS", "")
        names = environ.get("LISTEN_FDNAMES")
        if not pid.isdigit() or int(pid) != os.getpid() or not count:
            return []
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"LISTEN_FDS={count!r} is not a number") from None
        if n < 0:
            raise ValueError(f"LISTEN_FDS={count!r} is negative")
        split = names.split(":") if names is not None else []
        result: list[tuple[int, str]] = []
        for i in range(n):
            fd = SD_LISTEN_FDS_START + i
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            name = split[i] if i < len(split) and split[i] else "unknown"
            result.append((fd, name))
        return result
    finally:
        if unset:
            for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(key, None)


def socket_from_fd(fd: int) -> socket.socket:
    """A socket object owning `fd`; family, type and protocol are read from the kernel.

    Closing the returned socket closes `fd`. Raises OSError (ENOTSOCK) for a non-socket.
    """
    return socket.socket(fileno=fd)


def under_journald(environ: Mapping[str, str] = os.environ, fd: int = 2) -> bool:
    """Whether `fd` (stderr) is connected to the journal.

    systemd.exec(5): $JOURNAL_STREAM is "DEVICE:INODE" of the stream systemd connected to
    stderr/stdout, and programs "should compare" it with fstat() of their stderr, because
    the variable is inherited by children whose stderr went elsewhere (a terminal started
    from a user service, a `2>file` redirect). When the value can't be parsed or fstat()
    fails, the variable's presence is all there is to go on.
    """
    value = environ.get("JOURNAL_STREAM")
    if not value:
        return False
    dev, _, ino = value.partition(":")
    try:
        want = (int(dev), int(ino))
    except ValueError:
        return True
    try:
        st = os.fstat(fd)
    except OSError:
        return True
    return (st.st_dev, st.st_ino) == want
