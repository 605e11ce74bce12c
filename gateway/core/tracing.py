"""W3C Trace Context (https://www.w3.org/TR/trace-context/): `traceparent` in, out.

The gateway is one span on the path: a valid incoming `traceparent` keeps its
trace id and flags and gets the gateway's own span id as the parent id the
target sees (with `tracestate` passed on untouched); anything else starts a
new trace, and the incoming `tracestate` is dropped with it (§3.3.1.1: a
vendor that could not parse `traceparent` must not pass on `tracestate`,
which belongs to the trace that was refused).

Parsing follows §3.2 and §4.3 ("Versioning of traceparent"):
- lowercase hex only: "Vendors MUST ignore the traceparent when ... not
  lowercase" (uppercase is not the same header, it is an invalid one);
- version `ff` is invalid; `00` is exactly 55 characters; a higher version
  may be longer, provided the 56th character is "-", and is read as 00
  (sent on as version 00, the version this gateway speaks);
- an all-zero trace id or parent id is invalid;
- the header sent twice is invalid (which one would be the parent?).

New trace ids are random (§3.2.2.3: "SHOULD be ... randomly generated");
new traces go out with the sampled flag set: the gateway has no sampler, and
a target's parent-based sampler (OpenTelemetry's default) would otherwise
drop every trace the gateway starts, whose id the access log shows.
"""

from __future__ import annotations

import random
import re
from typing import Final

__all__ = ["TraceContext", "new_span_id", "parse_traceparent", "trace_context"]

# version "-" trace-id "-" parent-id "-" flags, lowercase hex (§3.2.2).
_TRACEPARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
_V00_LENGTH: Final = 55
# A new trace's flags: sampled (see the module docstring).
NEW_TRACE_FLAGS: Final = "01"

# Not `secrets`: ids need to be unique, not secret, and this is per request.
# random.Random() seeds itself from os.urandom.
_bits = random.Random().getrandbits


def _new_ids() -> tuple[str, str]:
    """A new trace id and span id: one 192-bit draw, one format, two slices
    (half the cost of two draws and two formats, per request)."""
    while True:  # an all-zero id is invalid; one draw in 2**64 loops again
        both = f"{_bits(192):048x}"
        trace_id, span_id = both[:32], both[32:]
        if trace_id != _ZERO_TRACE and span_id != _ZERO_SPAN:
            return trace_id, span_id


def new_span_id() -> str:
    while True:
        value = _bits(64)
        if value:
            return f"{value:016x}"


class TraceContext:
    """The trace one request belongs to, and the gateway's span in it.

    `continued`: the trace came from the client (its `tracestate` goes on);
    False when the gateway started it. `traceparent`: the header the target
    gets, version 00 with the gateway's span as parent (built here, once: every
    proxied request sends it).
    """

    __slots__ = ("continued", "flags", "span_id", "trace_id", "traceparent")

    def __init__(self, trace_id: str, span_id: str, flags: str, continued: bool) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.flags = flags
        self.continued = continued
        self.traceparent = f"00-{trace_id}-{span_id}-{flags}"


def parse_traceparent(value: str) -> tuple[str, str] | None:
    """(trace id, flags) of a valid `traceparent`, or None (see module docstring)."""
    match = _TRACEPARENT.match(value)  # one C-level pass; [0-9a-f] is ASCII only
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.groups()
    if version == "ff":
        return None
    if len(value) != _V00_LENGTH and (version == "00" or value[_V00_LENGTH] != "-"):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    if version != "00":
        # §4.3: of a future version only the sampled bit is understood.
        flags = "01" if int(flags, 16) & 1 else "00"
    return trace_id, flags


def trace_context(values: list[str] | None) -> TraceContext:
    """The request's trace: continued from its one valid `traceparent`, or new.

    `values`: every `traceparent` line the request carried (None: none).
    """
    if values is not None and len(values) == 1:
        parsed = parse_traceparent(values[0])
        if parsed is not None:
            return TraceContext(parsed[0], new_span_id(), parsed[1], True)
    # A new trace: most requests. `_new_ids` inline, a call per request saved
    # (the two draw and split alike: change them together).
    both = f"{_bits(192):048x}"
    trace_id, span_id = both[:32], both[32:]
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        trace_id, span_id = _new_ids()  # one draw in 2**64
    return TraceContext(trace_id, span_id, NEW_TRACE_FLAGS, False)
