"""Errors a request can end in, each carrying the fields its reply needs.

Handlers raise these; the RPC router is the one place that turns them into
reply envelopes, so a status code is decided exactly once.
"""

from __future__ import annotations


class RpcError(Exception):
    status: int = 500
    code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field

    def error_body(self) -> dict[str, str]:
        body = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class BadRequest(RpcError):
    status = 400
    code = "invalid_request"


class Unauthorized(RpcError):
    status = 401
    code = "unauthorized"


class Forbidden(RpcError):
    status = 403
    code = "forbidden"


class NotFound(RpcError):
    status = 404
    code = "not_found"


class Conflict(RpcError):
    status = 409
    code = "conflict"


class Gone(RpcError):
    status = 410
    code = "gone"


class PayloadTooLarge(RpcError):
    status = 413
    code = "payload_too_large"


class RateLimited(RpcError):
    status = 429
    code = "rate_limited"


class Unavailable(RpcError):
    status = 503
    code = "unavailable"


class GatewayTimeout(RpcError):
    status = 504
    code = "timeout"


class StoreUnavailable(Unavailable):
    """The database refused a read or write (disk full, read-only, locked)."""

    code = "store_unavailable"


class ConfigError(Exception):
    """Configuration is invalid; `key` names the offending dotted key when known."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
