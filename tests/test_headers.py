"""Header rewriting, request IDs and client-IP attribution (gateway.headers)."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.core.headers import (
    HOP_BY_HOP,
    TrustedProxies,
    client_response_headers,
    connection_tokens,
    encode_head,
    new_request_id,
    request_id,
    upstream_request_headers,
)


def proxy(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def upstream(incoming: CIMultiDictProxy[str], **kw: Any) -> CIMultiDict[str]:
    args: dict[str, Any] = {
        "peer": "203.0.113.7",
        "peer_trusted": False,
        "scheme": "https",
        "host": "api.example.com",
        "request_id": "rid-1",
        "preserve_host": True,
        "target_host": "127.0.0.1:9001",
    }
    args.update(kw)
    return upstream_request_headers(incoming, **args)


ALL_HOP_BY_HOP = [
    ("Connection", "keep-alive"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Transfer-Encoding", "chunked"),
    ("Upgrade", "websocket"),
    ("Proxy-Authorization", "Basic eA=="),
    ("Proxy-Authenticate", "Basic"),
]


def test_hop_by_hop_set_is_lower_case_and_complete() -> None:
    assert {name.lower() for name, _ in ALL_HOP_BY_HOP} == HOP_BY_HOP


def test_connection_tokens_from_every_line_trimmed_lower_cased() -> None:
    headers = proxy(("Connection", "Keep-Alive, X-Foo ,, "), ("connection", "x-BAR"))
    assert connection_tokens(headers) == {"keep-alive", "x-foo", "x-bar"}
    assert connection_tokens(proxy()) == set()


# --- requests to the target ---------------------------------------------------


def test_request_drops_hop_by_hop_and_keeps_content_length() -> None:
    out = upstream(proxy(*ALL_HOP_BY_HOP, ("Content-Length", "12"), ("Accept", "*/*")))
    for name, _ in ALL_HOP_BY_HOP:
        assert name not in out
    assert out.getall("Content-Length") == ["12"]
    assert out["Accept"] == "*/*"


def test_request_drops_headers_named_in_connection() -> None:
    out = upstream(
        proxy(
            ("Connection", "close, X-Secret"),
            ("connection", "X-Other"),
            ("x-secret", "1"),
            ("X-SECRET", "2"),
            ("X-Other", "3"),
            ("X-Kept", "4"),
        )
    )
    assert "X-Secret" not in out
    assert "X-Other" not in out
    assert out["X-Kept"] == "4"


def test_connection_cannot_remove_content_length() -> None:
    # RFC 9110 §7.6.1: Content-Length is end-to-end; naming it as a
    # connection option must not strip the framing the gateway relies on.
    incoming = proxy(("Connection", "Content-Length"), ("Content-Length", "5"))
    assert upstream(incoming)["Content-Length"] == "5"
    assert client_response_headers(incoming, request_id="r")["Content-Length"] == "5"


def test_request_keeps_duplicates_and_order() -> None:
    incoming = proxy(
        ("Accept", "a"),
        ("X-Dup", "1"),
        ("Cookie", "a=1"),
        ("x-dup", "2"),
        ("Cookie", "b=2"),
    )
    out = upstream(incoming)
    assert out.getall("X-Dup") == ["1", "2"]
    assert out.getall("Cookie") == ["a=1", "b=2"]
    copied = [(k.lower(), v) for k, v in out.items() if k.lower() in {"accept", "x-dup", "cookie"}]
    assert copied == [(k.lower(), v) for k, v in incoming.items()]


def test_request_does_not_touch_the_incoming_headers() -> None:
    source = CIMultiDict([("Connection", "x-a"), ("X-A", "1"), ("Via", "1.0 edge")])
    upstream(CIMultiDictProxy(source))
    assert list(source.items()) == [("Connection", "x-a"), ("X-A", "1"), ("Via", "1.0 edge")]


def test_x_forwarded_for_appends_the_peer_or_sets_it() -> None:
    assert upstream(proxy())["X-Forwarded-For"] == "203.0.113.7"
    out = upstream(proxy(("X-Forwarded-For", "198.51.100.1")))
    assert out.getall("X-Forwarded-For") == ["198.51.100.1, 203.0.113.7"]
    # Several lines are one list (RFC 9110 §5.3), appended to in order.
    out = upstream(proxy(("X-Forwarded-For", "1.1.1.1, 2.2.2.2"), ("X-Forwarded-For", "3.3.3.3")))
    assert out.getall("X-Forwarded-For") == ["1.1.1.1, 2.2.2.2, 3.3.3.3, 203.0.113.7"]
    out = upstream(proxy(), peer="2001:db8::7")
    assert out["X-Forwarded-For"] == "2001:db8::7"


def test_forwarded_proto_and_host_overwritten_from_untrusted_peer() -> None:
    incoming = proxy(
        ("Host", "api.example.com"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
    )
    out = upstream(incoming, peer_trusted=False, scheme="http")
    assert out.getall("X-Forwarded-Proto") == ["http"]
    assert out.getall("X-Forwarded-Host") == ["api.example.com"]


def test_untrusted_peer_without_host_loses_a_claimed_forwarded_host() -> None:
    out = upstream(proxy(("X-Forwarded-Host", "evil.example")), host=None)
    assert "X-Forwarded-Host" not in out


def test_forwarded_proto_and_host_kept_from_trusted_peer() -> None:
    incoming = proxy(("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "public.example"))
    out = upstream(incoming, peer_trusted=True, scheme="http", host="internal:8080")
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("X-Forwarded-Host") == ["public.example"]


def test_forwarded_proto_and_host_set_by_trusted_peer_when_absent() -> None:
    out = upstream(proxy(), peer_trusted=True, scheme="http", host="internal:8080")
    assert out["X-Forwarded-Proto"] == "http"
    assert out["X-Forwarded-Host"] == "internal:8080"


def test_via_appended_or_set() -> None:
    assert upstream(proxy())["Via"] == "1.1 gateway"
    out = upstream(proxy(("Via", "1.0 edge"), ("via", "1.1 lb")))
    assert out.getall("Via") == ["1.0 edge, 1.1 lb, 1.1 gateway"]


def test_request_id_replaces_the_incoming_header() -> None:
    out = upstream(proxy(("X-Request-ID", "client"), ("x-request-id", "dup")), request_id="ours")
    assert out.getall("X-Request-ID") == ["ours"]


@pytest.mark.parametrize(
    ("preserve_host", "client_host", "expected"),
    [
        (True, "api.example.com:8443", "api.example.com:8443"),
        (True, None, "127.0.0.1:9001"),
        (False, "api.example.com", "127.0.0.1:9001"),
        (False, None, "127.0.0.1:9001"),
    ],
)
def test_host_preserved_or_target(
    preserve_host: bool, client_host: str | None, expected: str
) -> None:
    incoming = proxy(("Host", client_host)) if client_host else proxy()
    out = upstream(incoming, preserve_host=preserve_host, host=client_host)
    assert out.getall("Host") == [expected]


# --- responses to the client -----------------------------------------------------


def test_response_drops_hop_by_hop_and_connection_named_keeps_the_rest() -> None:
    response = proxy(
        *ALL_HOP_BY_HOP,
        ("Connection", "X-Internal"),
        ("X-Internal", "secret"),
        ("Content-Length", "42"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Via", "1.1 app"),
        ("X-Request-ID", "target-made"),
    )
    out = client_response_headers(response, request_id="rid-9")
    for name, _ in ALL_HOP_BY_HOP:
        assert name not in out
    assert "X-Internal" not in out
    assert out["Content-Length"] == "42"
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert out.getall("Via") == ["1.1 app, 1.1 gateway"]
    assert out.getall("X-Request-ID") == ["rid-9"]


def test_response_via_and_request_id_set_when_absent() -> None:
    out = client_response_headers(proxy(("Content-Type", "text/plain")), request_id="r")
    assert out["Via"] == "1.1 gateway"
    assert out["X-Request-ID"] == "r"
    assert out["Content-Type"] == "text/plain"


# --- request ids ---------------------------------------------------------------


def _new() -> str:
    return "NEW"


@pytest.mark.parametrize(
    "value",
    ["a", "x" * 128, "!~", "0f3c-4b1e_9a.z:/=+"],
)
def test_sane_client_request_id_is_kept(value: str) -> None:
    assert request_id(value, _new) == value


@pytest.mark.parametrize(
    "value",
    [None, "", "x" * 129, "a b", "a\tb", "a\x00b", "a\x7f", "caf\u00e9", "a\r\nX-Evil: 1", " a"],
)
def test_insane_client_request_id_is_replaced(value: str | None) -> None:
    assert request_id(value, _new) == "NEW"


@given(st.text(max_size=140))
@example("\x20")
@example("\x7f")
@example("x" * 128)
def test_request_id_bounds(value: str) -> None:
    sane = 1 <= len(value) <= 128 and all(0x21 <= ord(c) <= 0x7E for c in value)
    assert request_id(value, _new) == (value if sane else "NEW")


def test_new_request_id_is_hex_and_unique() -> None:
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    for rid in list(ids)[:10]:
        assert len(rid) == 32
        int(rid, 16)
        assert request_id(rid, _new) == rid  # our own ids pass our own check


# --- trusted proxies and the client IP --------------------------------------------

TRUSTED = TrustedProxies(["10.0.0.0/8", "127.0.0.1", "fd00::/8"])


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("10.1.2.3", True),
        ("127.0.0.1", True),
        ("127.0.0.2", False),
        ("::ffff:127.0.0.1", True),  # IPv4-mapped, as a dual-stack socket reports it
        ("::ffff:10.9.9.9", True),
        ("fd12::1", True),
        ("2001:db8::1", False),
        ("", False),
        ("not-an-ip", False),
    ],
)
def test_is_trusted(peer: str, trusted: bool) -> None:
    assert TRUSTED.is_trusted(peer) is trusted


def test_empty_list_trusts_nobody() -> None:
    nobody = TrustedProxies([])
    assert not nobody.is_trusted("127.0.0.1")
    assert nobody.client_ip("127.0.0.1", ["1.2.3.4"]) == "127.0.0.1"


def test_bad_cidr_raises() -> None:
    with pytest.raises(ValueError, match=r"10\.0\.0\.0/33"):
        TrustedProxies(["10.0.0.0/33"])


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("203.0.113.9", ["1.2.3.4"], "203.0.113.9"),  # untrusted peer: its own address
        ("10.0.0.1", None, "10.0.0.1"),
        ("10.0.0.1", [], "10.0.0.1"),
        ("10.0.0.1", ["1.2.3.4"], "1.2.3.4"),
        ("10.0.0.1", ["6.6.6.6, 1.2.3.4, 10.0.0.2"], "1.2.3.4"),  # spoofed left part ignored
        ("10.0.0.1", ["6.6.6.6", "1.2.3.4, 10.0.0.2"], "1.2.3.4"),  # several lines
        ("10.0.0.1", ["10.0.0.3, 10.0.0.2"], "10.0.0.3"),  # all trusted: leftmost
        ("10.0.0.1", ["1.2.3.4, unknown, 10.0.0.2"], "10.0.0.2"),  # stop at garbage
        ("10.0.0.1", ["garbage"], "10.0.0.1"),
        ("10.0.0.1", ["1.2.3.4,, 10.0.0.2 ,"], "1.2.3.4"),  # empty elements skipped
        ("10.0.0.1", ["1.2.3.4:5678"], "1.2.3.4"),  # ports some proxies append
        ("10.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("10.0.0.1", ["2001:DB8::1"], "2001:db8::1"),
        ("::ffff:10.0.0.1", ["1.2.3.4"], "1.2.3.4"),
        ("10.0.0.1", ["::ffff:127.0.0.1"], "127.0.0.1"),  # mapped: trusted, leftmost
    ],
)
def test_client_ip(peer: str, xff: list[str] | None, expected: str) -> None:
    assert TRUSTED.client_ip(peer, xff) == expected


TRUSTED_POOL = ["10.0.0.1", "10.2.3.4", "127.0.0.1", "fd00::5", "::ffff:10.0.0.9"]
UNTRUSTED_POOL = ["1.2.3.4", "198.51.100.7", "2001:db8::1", "::ffff:8.8.8.8", "127.0.0.2"]
GARBAGE = ["unknown", "", "1.2.3", "[::1", "x:y:z"]


def _addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    a = ipaddress.ip_address(text.strip())
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def _trusted(text: str) -> bool:
    return any(
        _addr(text) in ipaddress.ip_network(c) for c in ["10.0.0.0/8", "127.0.0.1", "fd00::/8"]
    )


@given(
    peer=st.sampled_from(TRUSTED_POOL + UNTRUSTED_POOL),
    chain=st.lists(st.sampled_from(TRUSTED_POOL + UNTRUSTED_POOL), max_size=6),
    lines=st.integers(1, 3),
)
@example(peer="10.0.0.1", chain=["1.2.3.4", "10.0.0.2"], lines=1)
def test_xff_walk_laws(peer: str, chain: list[str], lines: int) -> None:
    # Split the chain into consecutive header lines: one list either way.
    size = max(1, -(-len(chain) // lines))
    xff = [", ".join(chain[i : i + size]) for i in range(0, len(chain), size)] or None
    got = TRUSTED.client_ip(peer, xff)

    # Never an address that was not there.
    assert _addr(got) in {_addr(a) for a in [peer, *chain]}
    if not _trusted(peer):
        assert got == peer
        return
    # Never a trusted address unless every hop is trusted ...
    if _trusted(got):
        assert all(_trusted(a) for a in chain)
        # ... and then the leftmost one (or the peer with no chain).
        assert _addr(got) == _addr(chain[0] if chain else peer)
    else:
        # The first untrusted address from the right.
        assert _addr(got) == _addr(next(a for a in reversed(chain) if not _trusted(a)))


@given(
    chain=st.lists(st.sampled_from(TRUSTED_POOL + UNTRUSTED_POOL + GARBAGE), max_size=6),
)
@example(chain=["1.2.3.4", "unknown", "10.0.0.2"])
def test_xff_walk_with_garbage_only_returns_good_addresses(chain: list[str]) -> None:
    peer = "10.0.0.1"
    got = TRUSTED.client_ip(peer, [", ".join(chain)])
    good = [peer] + [a for a in chain if a.strip() and a not in GARBAGE]
    assert _addr(got) in {_addr(a) for a in good}
    # Nothing left of the rightmost garbage entry can be the answer.
    bad = [i for i, a in enumerate(chain) if a.strip() and a in GARBAGE]
    if bad:
        allowed = {_addr(a) for a in [peer, *chain[bad[-1] + 1 :]] if a.strip()}
        assert _addr(got) in allowed


def test_request_ids_are_unique_hex_across_batches_and_forks() -> None:
    seen = {new_request_id() for _ in range(1000)}  # several 4 KiB batches
    assert len(seen) == 1000
    assert all(len(rid) == 32 and int(rid, 16) >= 0 for rid in seen)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id must not be the parent's next id
        os.write(write_end, new_request_id().encode())
        os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child_id) == 32
    assert child_id != new_request_id()


def test_encode_head_frames_fields_refuses_split_lines_and_keeps_raw_bytes() -> None:
    assert encode_head("HTTP/1.1 204 No Content", []) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert encode_head("GET / HTTP/1.1", [("Host", "x"), ("A", "")]) == (
        b"GET / HTTP/1.1\r\nHost: x\r\nA: \r\n\r\n"
    )
    for bad in ("1\r\nX-Injected: 1", "1\rx", "1\nx"):
        with pytest.raises(ValueError, match="CR or LF"):
            encode_head("HTTP/1.1 200 OK", [("X-A", bad)])
    # A byte that was not UTF-8 on the way in ("surrogateescape") goes out as it came.
    raw = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert encode_head("HTTP/1.1 200 OK", [("X-A", raw)]).endswith(b"X-A: caf\xe9\r\n\r\n")


def test_encode_head_refuses_cr_or_lf_in_any_name_value_or_start_line() -> None:
    # Wherever the CR or LF is: a name, a value (ASCII, Latin-1, wide, or
    # astral text, which Python stores 1, 2 or 4 bytes a character), the
    # first or last field, or the start line.
    for text in ("\r", "\n", "\r\n", "caf\u00e9\n", "\u20ac\rx", "\U0001f600\n", "a" * 300 + "\r"):
        for fields in (
            [("X-A", text)],
            [(f"X-{text}", "1")],
            [("A", "1"), ("B", "2"), ("X-A", text)],
            [("X-A", text), ("B", "2")],
        ):
            with pytest.raises(ValueError, match="CR or LF"):
                encode_head("HTTP/1.1 200 OK", fields)
        with pytest.raises(ValueError, match="CR or LF"):
            encode_head(f"HTTP/1.1 200 {text}", [("A", "1")])
    # Wide text without CR or LF goes out as UTF-8.
    assert encode_head("HTTP/1.1 200 OK", [("X-A", "\u20ac\U0001f600")]) == (
        "HTTP/1.1 200 OK\r\nX-A: \u20ac\U0001f600\r\n\r\n".encode()
    )


# --- client claims and underscore names (CONTRACT.md "Headers") --------------

CLAIMS = [
    ("Forwarded", "for=6.6.6.6;proto=https"),
    ("forwarded", 'for="[2001:db8::6]";by=gw'),
    ("FORWARDED", "for=6.6.6.6, for=7.7.7.7"),
    ("X-Real-IP", "6.6.6.6"),
    ("x-real-ip", "7.7.7.7"),
    ("X-REAL-IP", "8.8.8.8"),
]
UNDERSCORED = [
    ("X_Forwarded_For", "6.6.6.6"),
    ("x_forwarded_proto", "https"),
    ("X_Real_IP", "6.6.6.6"),
    ("X_REAL_IP", "7.7.7.7"),
    ("X-Forwarded_Host", "evil.example"),
    ("_", "x"),
    ("A_", "x"),
    ("_B", "y"),
]


def test_an_untrusted_peer_loses_every_forwarded_and_x_real_ip_line() -> None:
    out = upstream(proxy(*CLAIMS, ("X-Keep", "1")), peer_trusted=False)
    assert "Forwarded" not in out
    assert "X-Real-IP" not in out
    assert out["X-Keep"] == "1"


def test_a_trusted_peer_keeps_forwarded_and_x_real_ip_as_written() -> None:
    out = upstream(proxy(*CLAIMS), peer_trusted=True)
    assert out.getall("Forwarded") == [value for name, value in CLAIMS[:3]]
    assert out.getall("X-Real-IP") == [value for name, value in CLAIMS[3:]]


@pytest.mark.parametrize("trusted", [False, True])
def test_underscored_names_are_dropped_whoever_the_peer(trusted: bool) -> None:
    incoming = proxy(("X-Forwarded-For", "1.2.3.4"), *UNDERSCORED, ("X-Dash-Only", "ok"))
    out = upstream(incoming, peer_trusted=trusted, peer="203.0.113.7")
    assert not [name for name in out if "_" in name]
    assert out["X-Dash-Only"] == "ok"
    # The real X-Forwarded-For is the dash spelling alone, appended to.
    assert out.getall("X-Forwarded-For") == ["1.2.3.4, 203.0.113.7"]


_NAME_CHARS = st.sampled_from("abXY-_019")


@given(names=st.lists(st.text(_NAME_CHARS, min_size=1, max_size=6), max_size=10))
@example(names=["X_A", "x_a", "X_a"])
@example(names=["_", "-", "a_b", "A_B"])
def test_no_underscored_name_ever_reaches_a_target(names: list[str]) -> None:
    incoming = proxy(*((name, "v") for name in names))
    out = upstream(incoming)
    assert not [name for name in out if "_" in name]
    kept = [name.lower() for name, _ in out.items() if name in incoming]
    assert kept == [name.lower() for name in names if "_" not in name]
