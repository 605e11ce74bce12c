"""Header rewriting between client and target, request IDs, the client's IP.

Pure functions over multidict mappings; they run on every request, so each
is a copy plus a handful of keyed operations, nothing per header beyond the
C-level copy.

- Hop-by-hop fields (RFC 9110 §7.6.1; RFC 9112 §6.1 for Transfer-Encoding,
  §9.6 for TE/Trailer; RFC 9110 §11.7 for Proxy-Authenticate/-Authorization,
  which answer or authenticate to *this* hop) and every field named in
  Connection are dropped in both directions. Content-Length is end-to-end
  and kept (CONTRACT.md "Streaming": Content-Length is kept when the sender
  gave one), even if a peer names it in Connection: RFC 9110 §7.6.1 forbids
  connection options for fields meant for every recipient, and honouring one
  would let a client strip the framing the gateway relies on.
- Via is appended to (RFC 9110 §7.6.3), X-Forwarded-For appended to, and
  X-Forwarded-Proto/-Host believed only from `trusted_proxies`. From any
  other peer, Forwarded (RFC 7239) and X-Real-IP are removed: they claim the
  client's address or scheme, and this hop does not write them itself. From
  a trusted peer they are kept, as the proxy in front wrote them.
- Request header names holding "_" are dropped, whoever the peer, as nginx
  does by default (underscores_in_headers off): CGI-style backends (WSGI,
  PHP, Rack: HTTP_X_FORWARDED_FOR) read "X_Forwarded_For" and
  "X-Forwarded-For" as one name, so an underscore spelling would forge the
  fields this hop sets.
- `TrustedProxies.client_ip` walks X-Forwarded-For right to left to the first
  untrusted hop, like encode/uvicorn's `uvicorn/middleware/proxy_headers.py`:
  every hop to the right of it was appended by a proxy we trust, the entry
  it wrote is the address it saw; anything further left is the client's say.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections.abc import Callable, Collection, Sequence
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping, istr

from gateway.core.tracing import TraceContext

__all__ = [
    "HOP_BY_HOP",
    "VIA",
    "TrustedProxies",
    "client_response_headers",
    "connection_tokens",
    "encode_head",
    "interim_response_headers",
    "new_request_id",
    "request_id",
    "upstream_request_headers",
]

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",  # non-standard, still sent by old clients (RFC 9110 §7.6.1)
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)

# The same names as `istr`: a CIMultiDict lookup by an istr skips folding
# the name's case. Two lookups per name and request (the request's head and
# the response's).
_HOP_BY_HOP_KEYS: Final = tuple(istr(name) for name in sorted(HOP_BY_HOP))
# The fields every request or response sets or looks up, as istr (see above).
_CONNECTION: Final = istr("Connection")
_X_FORWARDED_FOR: Final = istr("X-Forwarded-For")
_X_FORWARDED_PROTO: Final = istr("X-Forwarded-Proto")
_X_FORWARDED_HOST: Final = istr("X-Forwarded-Host")
_VIA: Final = istr("Via")
_X_REQUEST_ID: Final = istr("X-Request-ID")
_TRACEPARENT: Final = istr("traceparent")
_TRACESTATE: Final = istr("tracestate")
_HOST: Final = istr("Host")

VIA: Final = "1.1 gateway"  # RFC 9110 §7.6.3: received-protocol received-by

# What an untrusted peer may not claim about the client (see module docstring).
_CLIENT_CLAIMS: Final = (istr("Forwarded"), istr("X-Real-IP"))

# End-to-end fields a Connection option may not remove (see module docstring).
_NOT_CONNECTION_OPTIONS: Final = frozenset({"content-length"})

_MAX_REQUEST_ID: Final = 128

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def connection_tokens(headers: MultiMapping[str]) -> set[str]:
    """Lower-cased field names listed in every Connection header line.

    RFC 9110 §7.6.1: Connection = #connection-option, case-insensitive
    tokens; empty list elements are allowed and ignored (§5.6.1).
    """
    tokens: set[str] = set()
    for line in headers.getall("Connection", ()):
        for item in line.split(","):
            token = item.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def _end_to_end(headers: MultiMapping[str]) -> CIMultiDict[str]:
    """A copy keeping order and duplicates, minus hop-by-hop and Connection-named fields."""
    named = connection_tokens(headers) if _CONNECTION in headers else None
    out = CIMultiDict(headers)  # C-level copy: order and repeated lines kept
    for hop in _HOP_BY_HOP_KEYS:
        if hop in out:
            del out[hop]  # deletes every line of that name
    if named:
        for name in named - _NOT_CONNECTION_OPTIONS:
            if name in out:
                del out[name]
    return out


def _append(out: CIMultiDict[str], name: str, value: str) -> None:
    """Append `value` to a list-valued field, merging repeated lines.

    RFC 9110 §5.3: repeated lines of a list field combine with ", " in order,
    so one line "a, b, value" means the same as the lines it replaces.
    """
    existing = out.getall(name, None)
    if existing:
        out[name] = ", ".join([*existing, value])
    else:
        out.add(name, value)


def upstream_request_headers(
    incoming: CIMultiDictProxy[str] | CIMultiDict[str],
    *,
    peer: str,
    peer_trusted: bool,
    scheme: str,
    host: str | None,
    request_id: str,
    preserve_host: bool,
    target_host: str,
    trace: TraceContext | None = None,
) -> CIMultiDict[str]:
    """The headers sent to the target for one client request.

    `peer` is the TCP peer's address, `host` the Host header the client sent
    (None if it sent none), `target_host` the target URL's "host:port",
    `trace` the request's W3C trace (the gateway's span becomes the parent).
    """
    out = _end_to_end(incoming)
    # One C-level join tells whether any name holds "_" (rare): no loop in
    # Python over every header on every request.
    if "_" in "".join(out.keys()):
        for name in [name for name in out if "_" in name]:
            out.popall(name, None)  # every line, any case (some went with an earlier one)

    # The peer is appended even when untrusted: the chain is kept for the
    # target's information, and `client_ip` decides what to believe of it.
    if peer:
        if _X_FORWARDED_FOR in out:
            _append(out, _X_FORWARDED_FOR, peer)
        else:  # the usual first hop, without a call
            out.add(_X_FORWARDED_FOR, peer)

    if peer_trusted:
        # A trusted proxy in front already said what the client used.
        if _X_FORWARDED_PROTO not in out:
            out[_X_FORWARDED_PROTO] = scheme
        if _X_FORWARDED_HOST not in out and host:
            out[_X_FORWARDED_HOST] = host
    else:
        # An untrusted peer could claim "https" or any host; overwrite with
        # what this hop saw (CONTRACT.md "Headers").
        out[_X_FORWARDED_PROTO] = scheme
        if host:
            out[_X_FORWARDED_HOST] = host
        elif _X_FORWARDED_HOST in out:
            del out[_X_FORWARDED_HOST]
        for name in _CLIENT_CLAIMS:
            if name in out:
                del out[name]

    if _VIA in out:
        _append(out, _VIA, VIA)
    else:
        out.add(_VIA, VIA)
    out[_X_REQUEST_ID] = request_id
    if trace is not None:
        out[_TRACEPARENT] = trace.traceparent
        if not trace.continued and _TRACESTATE in out:
            # The refused trace's vendor state (see gateway/core/tracing.py).
            out.popall(_TRACESTATE)
    # RFC 9110 §7.2: Host is the authority the client asked for; with
    # preserve_host off the target sees its own authority instead.
    out[_HOST] = (host or target_host) if preserve_host else target_host
    return out


def client_response_headers(
    upstream: CIMultiDictProxy[str] | CIMultiDict[str], *, request_id: str
) -> CIMultiDict[str]:
    """The headers sent to the client for a target's response."""
    out = _end_to_end(upstream)
    if _VIA in out:
        _append(out, _VIA, VIA)
    else:
        out.add(_VIA, VIA)
    # The gateway's id wins over whatever the target echoed, so the client,
    # the access log and the target's request all carry the same one.
    out[_X_REQUEST_ID] = request_id
    return out


def interim_response_headers(
    fields: Collection[tuple[str, str]], *, request_id: str
) -> CIMultiDict[str]:
    """The headers sent to the client for a target's interim (1xx) response.

    The rules of any response (hop-by-hop fields and the ones Connection
    names removed, Via, the gateway's X-Request-ID), and no framing fields:
    RFC 9110 8.6 forbids Content-Length in a 1xx, which has no body
    (RFC 9112 6.3). A `Link` of 103 Early Hints passes as it came.
    """
    out = client_response_headers(CIMultiDict(fields), request_id=request_id)
    out.popall("Content-Length", None)
    return out


def encode_head(start_line: str, fields: Collection[tuple[str, str]]) -> bytes:
    """A message head: the start line, the field lines and the empty line.

    Field lines are joined by `map(": ".join)`, in C (half the cost of an
    f-string per field). A CR or LF inside a name or value would split it
    into a second field (smuggling): none may be anywhere in the lines
    before they are joined with CRLF. Two `in` tests on the lines joined
    without separators are memchr scans; counting CR and LF in the head
    (the check before) went byte by byte, ~5k instructions per request
    for its two heads. Bytes that came in undecodable ("surrogateescape")
    go out as they came.
    """
    lines = [start_line, *map(": ".join, fields)]
    text = "".join(lines)
    if "\r" in text or "\n" in text:
        raise ValueError("CR or LF inside a header field")
    lines += ("", "")  # the CRLF that ends the last field, and the empty line
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")


def request_id(incoming_value: str | None, new: Callable[[], str]) -> str:
    """The client's X-Request-ID if sane (1-128 visible ASCII chars), else new().

    Visible ASCII is VCHAR, 0x21-0x7E (RFC 5234 App. B.1): no spaces or
    controls that could split a log line or smuggle a field.
    """
    if (
        incoming_value
        and len(incoming_value) <= _MAX_REQUEST_ID
        and incoming_value.isascii()
        and incoming_value.isprintable()  # ASCII printable = 0x20-0x7E
        and " " not in incoming_value
    ):
        return incoming_value
    return new()


class _RandomIds:
    """32 hex chars per id, from the kernel CSPRNG fetched 4 KiB at a time.

    One getrandom() syscall per 256 ids instead of one per request (os.urandom
    per id was ~1 µs of a 100 µs request). A forked child drops the inherited
    buffer so that no two processes hand out the same ids.
    """

    _BATCH: Final = 4096

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pool, self._at = b"", 0

    def __call__(self) -> str:
        at = self._at
        if at + 16 > len(self._pool):
            self._pool, at = os.urandom(self._BATCH), 0
        self._at = at + 16
        return self._pool[at : at + 16].hex()


new_request_id: Final = _RandomIds()


def _parse_address(text: str) -> _Address | None:
    """An address from a peer or X-Forwarded-For entry, or None if unparsable.

    Tolerates what proxies write in practice: "[v6]", "[v6]:port", "v4:port"
    (RFC 7239 §6 node syntax; e.g. Azure appends ports). An IPv4-mapped IPv6
    address (RFC 4291 §2.5.5.2, what a dual-stack socket reports for an IPv4
    peer) becomes the IPv4 address, so "127.0.0.0/8" covers it.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The `server.trusted_proxies` networks and what they let us believe."""

    __slots__ = ("_classify", "networks")

    def __init__(self, cidrs: Sequence[str]) -> None:
        # strict=False: "10.0.0.1/8" means the network around it, as in nginx
        # set_real_ip_from; a malformed CIDR still raises ValueError here (the
        # config loader reports it with its key).
        self.networks: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(c.strip(), strict=False) for c in cidrs
        )
        # Peers and XFF entries repeat; parse-and-test costs ~1-2 µs, a cache
        # hit ~50 ns. Bounded, so hostile unique values only cost a miss.
        self._classify: Callable[[str], tuple[str, bool] | None] = functools.lru_cache(
            maxsize=4096
        )(self._classify_uncached)

    def _classify_uncached(self, text: str) -> tuple[str, bool] | None:
        """(canonical address, trusted) for an entry, None if unparsable."""
        address = _parse_address(text)
        if address is None:
            return None
        # An IPv4 address is never in an IPv6 network and vice versa; the
        # `in` test just answers False, no version check needed.
        return str(address), any(address in network for network in self.networks)

    def is_trusted(self, peer: str) -> bool:
        """Whether the TCP peer is one of our proxies (empty list: nobody)."""
        if not self.networks:
            return False
        found = self._classify(peer)
        return found is not None and found[1]

    def client_ip(self, peer: str, forwarded_for: list[str] | None) -> str:
        """The address the request is attributed to (ip_hash, rate limits, logs).

        An untrusted peer is the client. From a trusted one, walk the
        X-Forwarded-For entries (all lines, comma-split) right to left: the
        first address outside the trusted networks is the client; if every
        entry is trusted, the leftmost. An unparsable entry ("unknown",
        garbage) ends the walk: nothing to its left can be attributed, so the
        last good address (possibly the peer) is the answer.
        """
        if not forwarded_for or not self.is_trusted(peer):
            return peer
        best = peer
        for line in reversed(forwarded_for):
            for item in reversed(line.split(",")):
                if not item.strip():
                    continue  # empty list elements are allowed (RFC 9110 §5.6.1)
                found = self._classify(item)
                if found is None:
                    return best
                address, trusted = found
                if not trusted:
                    return address
                best = address
        return best
