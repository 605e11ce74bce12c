"""Errors the gateway answers itself, as the contract's JSON.

Every refusal is a `GatewayError` with a status and a stable machine code;
`json_body()` renders `{"error", "message", "request_id"}`.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec


class GatewayError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    # `WWW-Authenticate` challenges, one field line each (RFC 9110 11.6.1).
    challenges: tuple[str, ...] = ()

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = headers or {}


class NoRoute(GatewayError):
    status = 404
    code = "no_route"


class MethodNotAllowed(GatewayError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, allowed: tuple[str, ...]) -> None:
        super().__init__("method not allowed on this route", {"Allow": ", ".join(allowed)})
        self.allowed = allowed


class Unauthorized(GatewayError):
    """No credentials, or none that a policy of the route accepts (RFC 9110 15.5.2)."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str, challenges: tuple[str, ...]) -> None:
        super().__init__(message)
        self.challenges = challenges


class Forbidden(GatewayError):
    """Authenticated but not allowed, or an address the route refuses."""

    status = 403
    code = "forbidden"

    def __init__(self, message: str, challenges: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.challenges = challenges


class BodyTooLarge(GatewayError):
    status = 413
    code = "body_too_large"


class RateLimited(GatewayError):
    status = 429
    code = "rate_limited"


class BadGateway(GatewayError):
    status = 502
    code = "bad_gateway"


class NoHealthyTarget(GatewayError):
    status = 503
    code = "no_healthy_target"


class UpstreamTimeout(GatewayError):
    status = 504
    code = "upstream_timeout"


class BadRequest(GatewayError):
    status = 400
    code = "bad_request"


class ClientTimeout(GatewayError):
    """The client went silent for `client_timeout` mid-head or mid-body."""

    status = 408
    code = "client_timeout"


class ConnectRefused(GatewayError):
    """CONNECT is never proxied (no tunnels, no open proxy); RFC 9110 10.2.1 Allow."""

    status = 405
    code = "method_not_allowed"


class UriTooLong(GatewayError):
    status = 414
    code = "uri_too_long"


class HeadersTooLarge(GatewayError):
    status = 431
    code = "header_fields_too_large"


class NotImplementedCoding(GatewayError):
    status = 501
    code = "not_implemented"


class VersionNotSupported(GatewayError):
    status = 505
    code = "http_version_not_supported"


class _Body(msgspec.Struct):
    error: str
    message: str
    request_id: str


_encoder = msgspec.json.Encoder()


def json_body(error: GatewayError, request_id: str) -> bytes:
    return _encoder.encode(_Body(error.code, error.message, request_id))
