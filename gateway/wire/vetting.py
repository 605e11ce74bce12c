"""Request-head checks that llhttp leaves to the application.

llhttp in strict mode (h1server.py) already refuses most framing attacks by
itself: Content-Length with Transfer-Encoding, differing or repeated
Content-Lengths, a Transfer-Encoding whose last coding is not chunked, bad
chunk sizes, obs-fold, bare CR or LF, NUL and other controls, whitespace
before the colon, unknown methods. `vet_head` refuses, before a request is
queued for the handler, what llhttp parses but the gateway must not serve.
"""

from __future__ import annotations

import re
from typing import Final

from multidict import CIMultiDict, istr
from yarl import URL

from gateway.core.errors import (
    BadRequest,
    ConnectRefused,
    GatewayError,
    NotImplementedCoding,
    VersionNotSupported,
)

# nginx's defaults are 8 KiB request lines; the target alone is limited here.
MAX_REQUEST_LINE: Final = 8192
MAX_FIELD_SIZE: Final = 16384
MAX_HEADERS: Final = 128
# The whole header section. Per-field and count limits alone would admit
# 128 x 16 KiB = 2 MiB of headers per request, copied to every target;
# nginx's large_client_header_buffers (4 x 8k) stops at 32 KiB.
MAX_HEAD_BYTES: Final = 65536

# RFC 9112 3.2 / RFC 3986 3.2.2-3.2.3: Host = uri-host [ ":" port ], where a
# host is an IP-literal in brackets or a reg-name (unreserved, pct-encoded,
# sub-delims). Anything else (spaces, "/", "@", non-ASCII) is an invalid field
# value, which RFC 9112 3.2 says a server MUST answer with 400.
HOST_SYNTAX: Final = re.compile(
    r"(?:\[[0-9A-Za-z:._~%!$&'()*+,;=-]+\]|[0-9A-Za-z._~%!$&'()*+,;=-]*)(?::[0-9]*)?",
    re.ASCII,
)
# Looked up per request: an `istr` skips folding the name's case each time.
_HOST: Final = istr("Host")
# The last Host value found valid: the same value again (every request of a
# client, mostly) is compared, not matched. A memo of a pure check, one
# string, never a different answer. It starts as "", which HOST_SYNTAX
# accepts too.
_valid_host = ""


def section_limit(fields: int, size: int) -> str | None:
    """Why a header or trailer section is over the caps, or None.

    `fields` counts its fields so far, `size` their bytes, each counted with
    ": " and CRLF. One rule for both directions: client heads (h1server.py)
    and the heads and trailers of target responses (h1client.py), which
    llhttp parses without any limit of its own.
    """
    if fields > MAX_HEADERS:
        return "too many header fields"
    if size > MAX_HEAD_BYTES:
        return "header section too large"
    return None


def vet_head(
    method: str,
    target: str,
    version: tuple[int, int],
    headers: CIMultiDict[str],
    coding: str | None,
) -> GatewayError | None:
    """What llhttp parsed but the gateway refuses, or None to go ahead.

    `coding` is the head's (first) Transfer-Encoding, None without one: the
    caller looks it up once for both (it frames the body by it). The
    section's size and field count were checked as the fields arrived
    (`section_limit`).
    """
    if version not in ((1, 0), (1, 1)):
        if version in ((2, 0), (0, 9)):
            # llhttp accepts HTTP/0.9 (a bare "GET /") and HTTP/2.0 request
            # lines; neither can be answered in HTTP/1.x framing (RFC 9110 15.6.6).
            return VersionNotSupported("only HTTP/1.0 and HTTP/1.1 are served here")
        return BadRequest("malformed request")
    if method == "CONNECT":
        # The gateway is no forward proxy. An empty Allow: the authority-form
        # target names no resource of ours (RFC 9110 10.2.1). nginx answers
        # CONNECT with 405 too.
        return ConnectRefused(
            "CONNECT is not supported: this is a gateway, not a forward proxy", {"Allow": ""}
        )
    global _valid_host
    hosts = headers.getall(_HOST, ())
    if len(hosts) > 1:
        return BadRequest("more than one Host header")
    if not hosts:
        if version == (1, 1):
            return BadRequest("HTTP/1.1 request without Host")  # RFC 9112 3.2
    elif hosts[0] != _valid_host:
        if HOST_SYNTAX.fullmatch(hosts[0]) is None:
            return BadRequest("invalid Host header")
        _valid_host = hosts[0]
    if coding is not None:
        if version == (1, 0):
            # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding MUST be
            # treated as having faulty framing (1.0 hops do not know chunked).
            return BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        codings = [c for c in (c.strip().lower() for c in coding.split(",")) if c]
        if not codings or codings[-1] != "chunked":
            # RFC 9112 6.3 rule 4: a request whose last coding is not chunked
            # has no reliable length (llhttp lets some spellings through).
            return BadRequest(f"Transfer-Encoding {coding!r} does not end in chunked")
        if codings != ["chunked"]:
            # Codings before chunked ("gzip, chunked") we cannot undo, and
            # dropping the header (hop-by-hop) would hand the target a coded
            # body as if plain: RFC 9112 6.1 says 501, as nginx does.
            return NotImplementedCoding(f"unsupported Transfer-Encoding {coding!r}")
    if target[:1] == "/":  # origin-form, the common case: first
        return None
    if target == "*":
        # RFC 9112 3.2.4: the asterisk-form belongs to OPTIONS alone (which
        # the proxy answers itself); llhttp takes it with any method.
        return None if method == "OPTIONS" else BadRequest('a "*" target is for OPTIONS only')
    return _vet_absolute_form(target)


def _vet_absolute_form(target: str) -> GatewayError | None:
    """Absolute-form: routed by our own table, never sent to the host it names
    (RFC 9112 3.2.2); it must at least be a sane http(s) URL."""
    try:
        url = URL(target, encoded=True)
    except ValueError:
        return BadRequest("malformed request target")
    if url.scheme.lower() not in ("http", "https") or not url.raw_host:
        return BadRequest("absolute-form target must be http or https")
    authority = url.raw_authority
    if "@" in authority:
        # RFC 9110 4.2.4: userinfo is to be treated as an error (it hides
        # the real authority), and it must not leak into X-Forwarded-Host.
        return BadRequest("userinfo in the request target")
    if HOST_SYNTAX.fullmatch(authority) is None:
        return BadRequest("invalid authority in the request target")
    return None
