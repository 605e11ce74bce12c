"""Certificate and key files named by the config: do they exist, parse and match?

`gateway check` (and every reload) must refuse a pair the TLS listener or an
upstream's mutual TLS could not load, naming the key; so each pair is loaded
here exactly as the context builders in `gateway.wire.tls` will load it, with
the `ssl` module (OpenSSL parses; nothing here reads PEM by hand). A key that
does not belong to its certificate fails `load_cert_chain` ("key values
mismatch"), as nginx's `ssl_certificate_key` check does at `nginx -t`.
"""

from __future__ import annotations

import os
import ssl
from typing import Final

# OpenSSL's short reasons, said the way an operator reads them.
_REASONS: Final = {
    "KEY_VALUES_MISMATCH": "the key does not belong to the certificate",
    "PEM_LIB": "not a PEM certificate or key",
    "NO_START_LINE": "no PEM data",
    "CA_MD_TOO_WEAK": "signed with a digest OpenSSL refuses",
    "EE_KEY_TOO_SMALL": "key too small",
}


def _readable(path: str, what: str) -> str | None:
    if not path:
        return f"{what} path must not be empty"
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"cannot read {what} {path!r}: {exc.strerror or exc}"
    if os.path.isdir(path):
        return f"{what} {path!r} is a directory"
    return None


def _reason(exc: ssl.SSLError) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason in _REASONS:
        return _REASONS[reason]
    return str(reason or exc)


def check_pair(cert: str, key: str) -> str | None:
    """Why this certificate and key cannot serve, or None."""
    for path, what in ((cert, "certificate"), (key, "key")):
        if problem := _readable(path, what):
            return problem
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A passphrase-protected key would prompt on a terminal: refused instead.
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        return f"certificate {cert!r} with key {key!r}: {_reason(exc)}"
    except (OSError, ValueError, TypeError) as exc:
        return f"certificate {cert!r} with key {key!r}: {exc}"
    return None


def _no_password() -> str:
    raise ValueError("the key is encrypted; the gateway needs it unencrypted")


def check_ca_file(path: str) -> str | None:
    """Why a CA bundle cannot be used to verify targets, or None."""
    if problem := _readable(path, "CA file"):
        return problem
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        return f"CA file {path!r}: {_reason(exc)}"
    if not context.get_ca_certs():
        return f"CA file {path!r} holds no CA certificate"
    return None


def certificate_names(cert: str) -> list[str]:
    """The DNS names of a certificate's subjectAltName (lower-cased), else its CN.

    `_test_decode_cert` is the stdlib's only reader of a certificate file
    into the dict `getpeercert()` returns; the file was already loaded by
    OpenSSL (`check_pair`), so it parses.
    """
    try:
        decoded = ssl._ssl._test_decode_cert(cert)  # type: ignore[attr-defined]
    except (ssl.SSLError, OSError, AttributeError):
        return []
    names = [
        str(value).lower() for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"
    ]
    if names:
        return names
    for rdn in decoded.get("subject", ()):
        for field, value in rdn:
            if field == "commonName":
                names.append(str(value).lower())
    return names
