"""The protocol's error vocabulary: one enum of codes, one exception per code.

Both sides share this file. The server turns any failure into an `Error` frame
with one of these codes (`ProtocolError.to_frame` in protocol.py); the client
turns an `Error` frame back into the matching exception (`error_from_code`),
so callers can `except PositionGap as e: replay from e.expected`.
"""

from __future__ import annotations

from enum import StrEnum

from fogline.errors import FoglineError


class ErrorCode(StrEnum):
    UNKNOWN_SESSION = "unknown_session"  # never seen or evicted: replay from position 0
    POSITION_GAP = "position_gap"  # start != the position the cloud expects (`expected`)
    BAD_FRAME = "bad_frame"  # not a valid message (type, field, size, codec payload)
    TOO_LARGE = "too_large"  # frame or row count over the negotiated limits
    OVERLOADED = "overloaded"  # queue or KV budget full: retry after `retry_after` s
    AUTH = "auth"  # missing or wrong bearer token
    VERSION = "version"  # protocol version not spoken by the peer
    MISMATCH = "mismatch"  # model fingerprint / split / hidden size differ
    SHUTTING_DOWN = "shutting_down"  # server is draining; reconnect elsewhere / later
    INTERNAL = "internal"  # a bug on the server; the session may be lost


# After these the server closes the connection (nothing sent on it can succeed).
FATAL_CODES = frozenset({ErrorCode.AUTH, ErrorCode.VERSION, ErrorCode.MISMATCH, ErrorCode.SHUTTING_DOWN})
# A client can recover from these by replaying, rewinding or waiting.
RECOVERABLE_CODES = frozenset({ErrorCode.UNKNOWN_SESSION, ErrorCode.POSITION_GAP, ErrorCode.OVERLOADED,
                               ErrorCode.SHUTTING_DOWN})


class ProtocolError(FoglineError):
    """A typed protocol failure. `req_id`/`session` say which request it answers."""

    code: str = ErrorCode.BAD_FRAME

    def __init__(self, message: str, *, req_id: int | None = None, session: str | None = None,
                 expected: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.req_id = req_id
        self.session = session
        self.expected = expected
        self.retry_after = retry_after

    @property
    def recoverable(self) -> bool:  # type: ignore[override]
        return self.code in RECOVERABLE_CODES

    @property
    def fatal(self) -> bool:
        return self.code in FATAL_CODES


class UnknownSession(ProtocolError):
    code = ErrorCode.UNKNOWN_SESSION


class PositionGap(ProtocolError):
    code = ErrorCode.POSITION_GAP


class BadFrame(ProtocolError):
    code = ErrorCode.BAD_FRAME


class TooLarge(ProtocolError):
    code = ErrorCode.TOO_LARGE


class Overloaded(ProtocolError):
    code = ErrorCode.OVERLOADED


class AuthError(ProtocolError):
    code = ErrorCode.AUTH


class VersionError(ProtocolError):
    code = ErrorCode.VERSION


class MismatchError(ProtocolError):
    code = ErrorCode.MISMATCH


class ShuttingDown(ProtocolError):
    code = ErrorCode.SHUTTING_DOWN


class InternalError(ProtocolError):
    code = ErrorCode.INTERNAL


class LinkDown(ProtocolError):
    """Client side only: the websocket is gone (never sent by a server)."""

    code = "link_down"

    @property
    def recoverable(self) -> bool:  # type: ignore[override]
        return True


_BY_CODE: dict[str, type[ProtocolError]] = {
    cls.code: cls for cls in (UnknownSession, PositionGap, BadFrame, TooLarge, Overloaded, AuthError,
                              VersionError, MismatchError, ShuttingDown, InternalError)
}


def error_from_code(code: str, message: str, **kw: object) -> ProtocolError:
    cls = _BY_CODE.get(code, InternalError)
    return cls(message, **kw)  # type: ignore[arg-type]
