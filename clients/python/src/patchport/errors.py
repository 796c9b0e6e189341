"""The SDK's exceptions: one base class, one subclass per kind of failure.

Every error the registry answers with becomes a subclass of :class:`PatchportError`
chosen by its gRPC status code, carrying the server's own message (``str(err)`` and
``err.message``) and the code (``err.code``). Failures found locally (a directory that is
not a model or an adapter, downloaded bytes that do not match their digest) use the same
classes, so callers catch one family.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Type

import grpc

__all__ = [
    "PatchportError",
    "InvalidArgument",
    "LayoutError",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "Unauthenticated",
    "FailedPrecondition",
    "Refused",
    "PortFailed",
    "ResourceExhausted",
    "OutOfRange",
    "Unavailable",
    "DigestMismatch",
    "Timeout",
    "from_rpc_error",
]


class PatchportError(Exception):
    """Base class of every error the SDK raises.

    Attributes:
        message: The server's message (or the SDK's, for a local failure).
        code: The gRPC status code when the registry answered with an error, else None.
    """

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class InvalidArgument(PatchportError):
    """The request is malformed: a bad reference, name, version, file or config."""


class LayoutError(InvalidArgument):
    """A local directory is not what the call needs (checked before anything is sent)."""


class NotFound(PatchportError):
    """Something the request names does not exist (a version, a base, a port)."""


class AlreadyExists(PatchportError):
    """The name and version exist with other content (versions are immutable)."""


class PermissionDenied(PatchportError):
    """The token lacks the scope or namespace the request needs."""


class Unauthenticated(PatchportError):
    """No valid token was sent to a registry that requires one."""


class FailedPrecondition(PatchportError):
    """The request is valid but the registry's state forbids it now (a port not done,
    a quality gate not passed, an upload not complete)."""


class Refused(FailedPrecondition):
    """The patch cannot be ported onto that base without loss (never a silent lossy port).

    Attributes:
        kinds: The refusal kinds the registry recorded (``dora``, ``modules_to_save``,
            ``architecture``, ``shape``, ...), in order.
        reasons: The matching human-readable reasons.
    """

    def __init__(
        self,
        message: str,
        kinds: Sequence[str] = (),
        reasons: Sequence[str] = (),
        code: Optional[grpc.StatusCode] = grpc.StatusCode.FAILED_PRECONDITION,
    ) -> None:
        super().__init__(message, code)
        self.kinds = list(kinds)
        self.reasons = list(reasons)


class PortFailed(FailedPrecondition):
    """A port ended without an artifact (failed or cancelled); ``state`` says which."""

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message, None)
        self.state = state


class ResourceExhausted(PatchportError):
    """A registry limit or rate was exceeded (chunk, header, tensor count, push rate)."""


class OutOfRange(PatchportError):
    """An event cursor past the end of this registry's log."""


class Unavailable(PatchportError):
    """The registry (or a store behind it) cannot be reached right now; retrying may work."""


class DigestMismatch(PatchportError):
    """Downloaded bytes do not hash to the digest the registry declared."""


class Timeout(PatchportError):
    """A wait ran out of time (``Client.wait_port``)."""


_BY_CODE: Dict[grpc.StatusCode, Type[PatchportError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def from_rpc_error(err: grpc.RpcError) -> PatchportError:
    """The SDK exception for a failed gRPC call: the class by status code, the server's
    message verbatim."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else None
    message = details or (code.name if code is not None else str(err))
    cls = _BY_CODE.get(code, PatchportError) if code is not None else PatchportError
    return cls(message, code)
