"""TLS contexts: the listeners' (certificates chosen by SNI, rotated on reload)
and the upstream client's (per-upstream verify, CA, SNI name, client certificate).

Listeners. asyncio fixes a listener's `SSLContext` when the server is
created, so the listener gets one *front* context whose `sni_callback` moves
each new connection onto the context of the certificate it asked for
(`SSLObject.context = ...`, OpenSSL's SSL_set_SSL_CTX, as nginx's
ssl_servername callback does). A reload builds a fresh context per
certificate and swaps the table in one assignment: a handshake that starts
later gets the new pair, a connection already open keeps the context it was
made with (OpenSSL holds a reference). A client without SNI, or naming no
certificate's host, gets the first certificate.

Every context offers ALPN `http/1.1` only: the listener speaks HTTP/1.1, and
an h2-only client must fail the handshake rather than send a preface we
would parse as a request (RFC 7301 3.2).

Upstreams. `ClientTLS` is one upstream's settings made into a context, built
when a config is applied (never per request) and cached by its settings and
the files' identities, so a reload that changes nothing reuses it and one
that rotates a client certificate (new file contents) builds a new one.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from typing import Final

log = logging.getLogger("gateway.tls")

ALPN: Final = ["http/1.1"]
_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class Certificate:
    cert: str
    key: str
    hosts: tuple[str, ...]


def _server_context(min_version: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[min_version]
    context.set_alpn_protocols(ALPN)
    # No session tickets kept in this process across reloads matter for
    # correctness; OpenSSL's defaults (tickets on) are kept for speed.
    return context


class _Table:
    """One generation of certificates: exact names, wildcard suffixes, default."""

    def __init__(self, contexts: list[tuple[Certificate, ssl.SSLContext]]) -> None:
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}
        self.default = contexts[0][1]
        for cert, context in contexts:
            for host in cert.hosts:
                if host.startswith("*."):
                    self.wildcard.setdefault(host[1:], context)  # ".example.com"
                else:
                    self.exact.setdefault(host, context)

    def pick(self, name: str | None) -> ssl.SSLContext:
        if not name:
            return self.default
        name = name.lower().rstrip(".")
        found = self.exact.get(name)
        if found is not None:
            return found
        # "*.example.com" covers one or more labels, as route hosts do.
        dot = name.find(".")
        while dot >= 0:
            found = self.wildcard.get(name[dot:])
            if found is not None:
                return found
            dot = name.find(".", dot + 1)
        return self.default


class ServerTLS:
    """The listeners' TLS: one front context, certificates swapped on reload."""

    def __init__(self, certificates: list[Certificate], min_version: str) -> None:
        self._table = self._build(certificates, min_version)
        self.front = _server_context(min_version)
        self.front.sni_callback = self._on_sni
        # The front context must hold a certificate of its own: OpenSSL
        # checks for one before the servername callback runs.
        first = certificates[0]
        self.front.load_cert_chain(first.cert, first.key)

    @staticmethod
    def _build(certificates: list[Certificate], min_version: str) -> _Table:
        """Raises ssl.SSLError / OSError when a pair cannot be loaded."""
        contexts = []
        for cert in certificates:
            context = _server_context(min_version)
            context.load_cert_chain(cert.cert, cert.key)
            contexts.append((cert, context))
        return _Table(contexts)

    def build(self, certificates: list[Certificate], min_version: str) -> _Table:
        """Load every pair for a reload; nothing is served from it yet.

        Raises ssl.SSLError / OSError when a pair cannot be loaded. Split
        from `swap` so the reload can still be rejected after this (a later
        step of the commit may fail) without having changed the listener.
        """
        return self._build(certificates, min_version)

    def swap(self, table: _Table, min_version: str) -> None:
        """Serve a built table from the next handshake on; cannot fail."""
        self.front.minimum_version = _VERSIONS[min_version]
        self._table = table

    def _on_sni(self, sslobj: ssl.SSLObject, name: str | None, _front: ssl.SSLContext) -> None:
        # Runs inside the handshake; an exception here would be reported as
        # unraisable and fail the handshake, so nothing here may raise.
        try:
            sslobj.context = self._table.pick(name)
        except Exception:  # pragma: no cover - defensive
            log.exception("choosing a certificate for SNI %r failed", name)


@dataclass(frozen=True)
class ClientTLS:
    """An upstream's TLS to its targets: the context and the name to check."""

    context: ssl.SSLContext
    #: SNI and the name the certificate must carry; None: the target URL's host.
    server_name: str | None
    #: Distinguishes the pooled connections of different settings to one
    #: host and port (two upstreams with different client certificates).
    tag: str


def _file_identity(path: str | None) -> tuple[str, int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return (path, -1, -1, -1)
    return (path, st.st_ino, st.st_size, st.st_mtime_ns)


class ClientContexts:
    """Per-upstream client contexts, cached by settings and file identities."""

    def __init__(self) -> None:
        self._cache: dict[tuple[object, ...], ClientTLS] = {}
        self._made = 0

    def get(
        self,
        *,
        verify: bool,
        ca_file: str | None,
        server_name: str | None,
        cert: str | None,
        key: str | None,
    ) -> ClientTLS:
        """The context for these settings; raises ssl.SSLError / OSError
        when a file cannot be loaded."""
        ident = (
            verify,
            _file_identity(ca_file),
            server_name,
            _file_identity(cert),
            _file_identity(key),
        )
        found = self._cache.get(ident)
        if found is not None:
            return found
        context = ssl.create_default_context(cafile=ca_file)
        if not verify:
            # Encrypted but unauthenticated, as nginx's proxy_ssl_verify off.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if cert is not None:
            context.load_cert_chain(cert, key)
        context.set_alpn_protocols(ALPN)
        self._made += 1
        made = ClientTLS(context, server_name, f"tls{self._made}")
        self._cache[ident] = made
        return made

    def retain(self, live: set[ClientTLS]) -> None:
        """Forget contexts no upstream uses any more (a reload changed them)."""
        for ident in [i for i, c in self._cache.items() if c not in live]:
            del self._cache[ident]
