"""The wire between edge and cloud: message schema, framing, hidden-state codecs.

Torch-free and llama.cpp-free: both runtimes import it (numpy + msgpack only).
"""

from fogline.wire.codecs import Codec, HiddenFrame, decode_hidden, encode_hidden
from fogline.wire.errors import (AuthError, BadFrame, ErrorCode, InternalError, LinkDown, MismatchError,
                                 Overloaded, PositionGap, ProtocolError, ShuttingDown, TooLarge, UnknownSession,
                                 VersionError, error_from_code)
from fogline.wire.protocol import (DEFAULT_MAX_FRAME, GREEDY, PROTOCOL_VERSION, Ack, Append, Bye, Close, Error,
                                   Hello, HelloOk, Infer, Message, Ping, Pong, Sampling, TokenReply, Truncate,
                                   Verdict, Verify, decode_frame, encode_frame, error_frame)

__all__ = [
    "Codec", "HiddenFrame", "decode_hidden", "encode_hidden",
    "AuthError", "BadFrame", "ErrorCode", "InternalError", "LinkDown", "MismatchError", "Overloaded",
    "PositionGap", "ProtocolError", "ShuttingDown", "TooLarge", "UnknownSession", "VersionError",
    "error_from_code",
    "DEFAULT_MAX_FRAME", "GREEDY", "PROTOCOL_VERSION", "Ack", "Append", "Bye", "Close", "Error", "Hello",
    "HelloOk", "Infer", "Message", "Ping", "Pong", "Sampling", "TokenReply", "Truncate", "Verdict", "Verify",
    "decode_frame", "encode_frame", "error_frame",
]
