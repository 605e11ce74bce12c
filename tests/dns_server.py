"""A real DNS server on loopback for tests: dnslib's DNSServer (UDP) with a
zone the test edits while it runs, or makes fail on cue."""

from __future__ import annotations

import threading
from typing import Any

from dnslib import QTYPE, RCODE, RR  # type: ignore[import-untyped]
from dnslib.server import BaseResolver, DNSLogger, DNSServer  # type: ignore[import-untyped]

from tests.redis_server import free_port


class Zone(BaseResolver):  # type: ignore[misc]
    """Answers from `records`: (name with trailing dot, "A"|"AAAA"|"SRV") -> RRs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[tuple[str, str], list[RR]] = {}
        self.rcode: int | None = None  # e.g. RCODE.SERVFAIL for every answer
        self.queries: list[tuple[str, str]] = []

    def set(self, name: str, qtype: str, zone_lines: str) -> None:
        """Replace the answers for (name, qtype) with RRs in zone-file syntax."""
        with self.lock:
            self.records[(name, qtype)] = RR.fromZone(zone_lines) if zone_lines else []

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = str(request.q.qname)
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append((name, qtype))
            if self.rcode is not None:
                reply.header.rcode = self.rcode
                return reply
            answers = self.records.get((name, qtype))
            if answers is None and not any(n == name for n, _ in self.records):
                reply.header.rcode = RCODE.NXDOMAIN
            for rr in answers or []:
                reply.add_answer(rr)
        return reply


class DnsServer:
    def __init__(self) -> None:
        self.zone = Zone()
        self.port = free_port()
        self.server = DNSServer(
            self.zone,
            port=self.port,
            address="127.0.0.1",
            logger=DNSLogger(logf=lambda _: None),
        )

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server.start_thread()

    def stop(self) -> None:
        self.server.stop()
        self.server.server.server_close()
