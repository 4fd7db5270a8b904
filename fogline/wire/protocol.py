"""The fogline wire protocol: typed messages, msgpack framing, validation.

One websocket carries binary frames; each frame is one msgpack map with a
kind `t`. The client opens with `hello`; after `hello_ok` it may multiplex any
number of sessions. Requests carry a client-chosen `id`; every reply carries
the same `id`. Every hidden-state payload carries its `start` position: the
cloud computes on it only if `start` is exactly the position it expects.

    client -> server                           server -> client
    hello    version fingerprint split token    hello_ok  limits, codecs, model facts
    append   id session start h [ack] [check]   ack       id session length [load] [checks]
    infer    id session start h sampling top_n  token     id session token length top [load] [checks]
             [check]
    verify   id session start h draft sampling  verdict   id session accepted token length [load] [checks]
    truncate id session length                  ack
    close    id session                         ack
    ping     id stamp                           pong      id stamp
                                                error     id code message session expected retry_after
                                                bye       reason retry_after   (server draining)

`verify`: rows h[0..n) are positions [start, start+n); draft[i] is the token the
edge proposes for position start+i+1 (so len(draft) == n-1 and row i+1 is the
h_K of draft[i]). The cloud accepts the longest prefix of drafts that matches
its own choice, returns it as `accepted`, plus its own token for the first
position it did not accept (or the bonus token after the last draft), and keeps
only positions [start, start+accepted+1) in its cache (`length`).

Load (`queue_ms`, `step_ms`): every ack/token/verdict that answers a deep-layer step says how
long that step waited in the cloud's batcher queue and how long its batched pass took, both
measured on the cloud; the edge's `auto` policy adds them to the link RTT (edge_runtime/policy.py).

Agreement checks (`check`, answered by `checked`/`agreed`): an append or infer may list
`(position, token)` pairs, each a row of the frame and the token the edge emitted after it on
its own (collab's confident exits). The cloud compares its greedy choice at those rows with
the edge's token and reports, in the session's next reply, how many it checked and how many
agreed since its last reply (an ack-less append has no reply of its own). That is collab's
live agreement, measured by the full model on the edge's real traffic.

Structured output: `infer` may carry `mask` and `verify` `masks` (one per row): the edge's
token masks (fogline/constraint.py) of the positions the cloud decides; with them the cloud
chooses, and judges each drafted prefix, among those tokens only.

`decode_frame` turns *any* byte string into either a message or a typed
ProtocolError; it never asserts and never lets a library exception escape.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from fogline.wire.codecs import Codec, HiddenFrame
from fogline.wire.errors import BadFrame, ErrorCode, ProtocolError, TooLarge, VersionError

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 8 << 20  # bytes per websocket frame
MAX_ID = (1 << 63) - 1
MAX_POSITION = 1 << 24
MAX_ROWS = 1 << 16
MAX_DIM = 1 << 16
MAX_TOP_N = 256
MAX_DRAFT = 1024
MAX_TEXT = 1024
SESSION_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@dataclass(frozen=True, slots=True)
class Sampling:
    """How the cloud picks a token. temperature 0 is greedy (top_p/top_k ignored)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None  # with a seed, the pick at a given position is reproducible

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


GREEDY = Sampling()


class Message:
    """Base of all frames. Subclasses are frozen dataclasses with a KIND."""

    KIND: ClassVar[str]
    REQUEST: ClassVar[bool] = False  # sent by clients

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.KIND}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, HiddenFrame):
                v = {"codec": str(v.codec), "rows": v.rows, "dim": v.dim, "data": v.data,
                     **({"scales": v.scales, "block": v.block} if v.codec == Codec.INT8 else {})}
            elif isinstance(v, Sampling):
                v = {k: x for k, x in dataclasses.asdict(v).items() if x is not None}
            elif isinstance(v, tuple):
                v = [list(x) if isinstance(x, tuple) else x for x in v]
            out[f.name] = v
        return out


# --- client -> server -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Message):
    KIND: ClassVar[str] = "hello"
    REQUEST: ClassVar[bool] = True
    fingerprint: str
    split: int
    token: str = ""
    client: str = ""
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Append(Message):
    """Extend the session with h_K of positions [start, start+rows); `ack` asks for a reply
    (without it, only an error is ever sent back for this id)."""

    KIND: ClassVar[str] = "append"
    REQUEST: ClassVar[bool] = True
    id: int
    session: str
    start: int
    h: HiddenFrame
    ack: bool = True
    # agreement checks: (position, edge token after it) for rows of this frame (see the module doc)
    check: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True, slots=True)
class Infer(Message):
    """Append, then answer with the token for position start+rows."""

    KIND: ClassVar[str] = "infer"
    REQUEST: ClassVar[bool] = True
    id: int
    session: str
    start: int
    h: HiddenFrame
    sampling: Sampling = GREEDY
    top_n: int = 0  # also return the n most likely (id, prob)
    # Also return the chosen token's log-probability and the n most likely (id, logprob) under
    # the deep model's own distribution (temperature 1): what OpenAI's `logprobs` reports.
    # None: not asked (nothing extra travels).
    logprobs: int | None = None
    # structured output: the allowed tokens of position start+rows (fogline/constraint.py's
    # zlib-compressed bitmask); the cloud chooses among them only
    mask: bytes | None = None
    check: tuple[tuple[int, int], ...] | None = None  # as Append.check


@dataclass(frozen=True, slots=True)
class Verify(Message):
    KIND: ClassVar[str] = "verify"
    REQUEST: ClassVar[bool] = True
    id: int
    session: str
    start: int
    h: HiddenFrame
    draft: tuple[int, ...]
    sampling: Sampling = GREEDY
    # For sampled verification: per draft position, the distribution q the edge drew the draft
    # from, as ((token, prob), ...), its whole support (q is 0 on every other id). Each entry
    # must hold its draft token with q > 0: accept/residual (min(1, p/q), norm(max(0, p - q)))
    # are then exact. Ignored when greedy.
    draft_probs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    # As Infer.logprobs, for every token the verdict settles (accepted drafts, then `token`).
    logprobs: int | None = None
    # structured output: masks[i] = allowed tokens of position start+i+1 (one per row), the
    # mask the edge drafted that position under; the cloud judges each prefix with it
    masks: tuple[bytes, ...] | None = None


@dataclass(frozen=True, slots=True)
class Truncate(Message):
    """Keep only positions [0, length) (a rewind; length beyond the session's is a gap)."""

    KIND: ClassVar[str] = "truncate"
    REQUEST: ClassVar[bool] = True
    id: int
    session: str
    length: int


@dataclass(frozen=True, slots=True)
class Close(Message):
    KIND: ClassVar[str] = "close"
    REQUEST: ClassVar[bool] = True
    id: int
    session: str


@dataclass(frozen=True, slots=True)
class Ping(Message):
    KIND: ClassVar[str] = "ping"
    REQUEST: ClassVar[bool] = True
    id: int
    stamp: float = 0.0  # echoed in the pong


# --- server -> client -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloOk(Message):
    KIND: ClassVar[str] = "hello_ok"
    server: str
    fingerprint: str
    split: int
    n_layers: int
    hidden_size: int
    vocab_size: int
    max_frame: int
    max_rows: int
    max_context: int
    session_ttl_s: float
    codecs: tuple[str, ...]
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Ack(Message):
    KIND: ClassVar[str] = "ack"
    id: int
    session: str
    length: int  # positions the cloud now holds for the session
    # the step this answers (an append's): batcher queue wait and pass time on the cloud, ms
    queue_ms: float | None = None
    step_ms: float | None = None
    # agreement checks of this session settled since its last reply (see the module doc)
    checked: int | None = None
    agreed: int | None = None


@dataclass(frozen=True, slots=True)
class TokenReply(Message):
    KIND: ClassVar[str] = "token"
    id: int
    session: str
    token: int
    length: int
    top: tuple[tuple[int, float], ...] = ()
    logprob: float | None = None  # only when the infer asked for logprobs
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    queue_ms: float | None = None  # as Ack
    step_ms: float | None = None
    checked: int | None = None
    agreed: int | None = None


@dataclass(frozen=True, slots=True)
class Verdict(Message):
    KIND: ClassVar[str] = "verdict"
    id: int
    session: str
    accepted: int
    token: int
    length: int
    # Only when the verify asked for logprobs: accepted + 1 entries, the accepted drafts then `token`.
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    queue_ms: float | None = None  # as Ack
    step_ms: float | None = None
    checked: int | None = None
    agreed: int | None = None


@dataclass(frozen=True, slots=True)
class Pong(Message):
    KIND: ClassVar[str] = "pong"
    id: int
    stamp: float = 0.0


@dataclass(frozen=True, slots=True)
class Error(Message):
    KIND: ClassVar[str] = "error"
    code: str
    message: str
    id: int | None = None
    session: str | None = None
    expected: int | None = None  # position_gap: where the cloud is
    retry_after: float | None = None  # overloaded / shutting_down

    @classmethod
    def of(cls, e: ProtocolError) -> "Error":
        return cls(code=str(e.code), message=str(e)[:MAX_TEXT], id=e.req_id, session=e.session,
                   expected=e.expected, retry_after=e.retry_after)


@dataclass(frozen=True, slots=True)
class Bye(Message):
    """The server is shutting down; the connection closes after this frame."""

    KIND: ClassVar[str] = "bye"
    reason: str
    retry_after: float = 1.0


# --- validation ---------------------------------------------------------------

_MISSING = object()


class _Reader:
    """Typed access to one decoded map; every failure is a BadFrame naming the field."""

    def __init__(self, kind: str, d: dict[str, Any]) -> None:
        self.kind, self.d = kind, d

    def _get(self, name: str, default: Any) -> Any:
        if name in self.d:
            return self.d[name]
        if default is _MISSING:
            raise BadFrame(f"{self.kind}: missing field {name!r}")
        return default

    def _bad(self, name: str, want: str, v: Any) -> BadFrame:
        return BadFrame(f"{self.kind}.{name}: expected {want}, got {type(v).__name__}")

    def int(self, name: str, lo: int = 0, hi: int = MAX_ID, default: Any = _MISSING) -> Any:
        v = self._get(name, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, int) or isinstance(v, bool):
            raise self._bad(name, "an integer", v)
        if not lo <= v <= hi:
            raise BadFrame(f"{self.kind}.{name}={v} is outside [{lo}, {hi}]")
        return v

    def float(self, name: str, lo: float, hi: float, default: Any = _MISSING) -> Any:
        v = self._get(name, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise self._bad(name, "a number", v)
        if not (math.isfinite(v) and lo <= v <= hi):
            raise BadFrame(f"{self.kind}.{name}={v!r} is outside [{lo}, {hi}]")
        return float(v)

    def bool(self, name: str, default: Any = _MISSING) -> bool:
        v = self._get(name, default)
        if not isinstance(v, bool):
            raise self._bad(name, "a boolean", v)
        return v

    def str(self, name: str, max_len: int = MAX_TEXT, default: Any = _MISSING) -> Any:
        v = self._get(name, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, str):
            raise self._bad(name, "a string", v)
        if len(v) > max_len:
            raise BadFrame(f"{self.kind}.{name} is longer than {max_len} characters")
        return v

    def session(self, name: str = "session") -> str:
        v = self.str(name, 128)
        if not SESSION_RE.fullmatch(v):
            raise BadFrame(f"{self.kind}.{name} must be 1-128 characters of [A-Za-z0-9._:-]")
        return v

    def bytes(self, name: str, default: Any = _MISSING) -> Any:
        v = self._get(name, default)
        if v is None and default is None:
            return None
        if not isinstance(v, bytes):
            raise self._bad(name, "bytes", v)
        return v

    def list(self, name: str, max_len: int, default: Any = _MISSING) -> Any:
        v = self._get(name, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, list):
            raise self._bad(name, "a list", v)
        if len(v) > max_len:
            raise BadFrame(f"{self.kind}.{name} has more than {max_len} items")
        return v

    def ints(self, name: str, max_len: int) -> tuple[int, ...]:
        v = self.list(name, max_len)
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < (1 << 31) for x in v):
            raise BadFrame(f"{self.kind}.{name} must be a list of token ids")
        return tuple(v)

    def map(self, name: str, default: Any = _MISSING) -> "_Reader | None":
        v = self._get(name, default)
        if v is None and default is None:
            return None
        if not isinstance(v, dict):
            raise self._bad(name, "a map", v)
        return _Reader(f"{self.kind}.{name}", v)

    def hidden(self, name: str = "h") -> HiddenFrame:
        r = self.map(name)
        assert r is not None  # a required field: _get raised already otherwise
        codec_s = r.str("codec", 16)
        try:
            codec = Codec(codec_s)
        except ValueError:
            raise BadFrame(f"{r.kind}.codec {codec_s!r} is not one of "
                           f"{', '.join(c.value for c in Codec)}") from None
        rows, dim = r.int("rows", 1, MAX_ROWS), r.int("dim", 1, MAX_DIM)
        block = r.int("block", 1, 1 << 16) if codec is Codec.INT8 else 0
        scales = r.bytes("scales") if codec is Codec.INT8 else b""
        return HiddenFrame(codec, rows, dim, r.bytes("data"), scales, block)

    def sampling(self, name: str = "sampling") -> Sampling:
        r = self.map(name, default=None)
        if r is None:
            return GREEDY
        return Sampling(temperature=r.float("temperature", 0.0, 100.0, default=0.0),
                        top_p=r.float("top_p", 0.0, 1.0, default=1.0),
                        top_k=r.int("top_k", 0, 1 << 31, default=0),
                        seed=r.int("seed", 0, MAX_ID, default=None))

    def pairs(self, items: Any, where: str, max_len: int) -> tuple[tuple[int, float], ...]:
        if not isinstance(items, list) or len(items) > max_len:
            raise BadFrame(f"{where} must be a list of at most {max_len} [token, prob] pairs")
        out = []
        for p in items:
            if (not isinstance(p, list) or len(p) != 2 or not isinstance(p[0], int) or isinstance(p[0], bool)
                    or not 0 <= p[0] < (1 << 31) or not isinstance(p[1], (int, float)) or isinstance(p[1], bool)
                    or not (math.isfinite(p[1]) and 0.0 <= p[1] <= 1.0)):
                raise BadFrame(f"{where} must be a list of [token, prob] pairs with 0 <= prob <= 1")
            out.append((p[0], float(p[1])))
        return tuple(out)

    def check(self, start: int, rows: int) -> tuple[tuple[int, int], ...] | None:
        """Agreement checks: ascending, distinct (position, token) pairs on rows of this frame."""
        v = self.list("check", MAX_ROWS, default=None)
        if v is None:
            return None
        out: list[tuple[int, int]] = []
        for p in v:
            if (not isinstance(p, list) or len(p) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                  for x in p)):
                raise BadFrame(f"{self.kind}.check must be a list of [position, token] pairs")
            pos, tok = p
            if not start <= pos < start + rows:
                raise BadFrame(f"{self.kind}.check position {pos} is not a row of this frame "
                               f"[{start}, {start + rows})")
            if out and pos <= out[-1][0]:
                raise BadFrame(f"{self.kind}.check positions must be ascending and distinct")
            if not 0 <= tok < (1 << 31):
                raise BadFrame(f"{self.kind}.check token {tok} is not a token id")
            out.append((pos, tok))
        return tuple(out)

    def load(self) -> dict[str, Any]:
        """The optional step-load and check-count fields of a reply."""
        checked = self.int("checked", 0, MAX_ROWS * 1024, default=None)
        agreed = self.int("agreed", 0, MAX_ROWS * 1024, default=None)
        if (checked is None) != (agreed is None) or (checked is not None and agreed > checked):
            raise BadFrame(f"{self.kind}: checked/agreed must come together, agreed <= checked")
        return {"queue_ms": self.float("queue_ms", 0.0, 1e9, default=None),
                "step_ms": self.float("step_ms", 0.0, 1e9, default=None), "checked": checked, "agreed": agreed}

    def logprob(self, v: Any, where: str) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v <= 1e-6):
            raise BadFrame(f"{where} must be a finite log-probability (<= 0)")
        return min(float(v), 0.0)

    def logprob_pairs(self, items: Any, where: str) -> tuple[tuple[int, float], ...]:
        if not isinstance(items, list) or len(items) > MAX_TOP_N:
            raise BadFrame(f"{where} must be a list of at most {MAX_TOP_N} [token, logprob] pairs")
        out = []
        for p in items:
            if (not isinstance(p, list) or len(p) != 2 or not isinstance(p[0], int) or isinstance(p[0], bool)
                    or not 0 <= p[0] < (1 << 31)):
                raise BadFrame(f"{where} must be a list of [token, logprob] pairs")
            out.append((p[0], self.logprob(p[1], where)))
        return tuple(out)


def _parse(kind: str, r: _Reader) -> Message:
    if kind == "hello":
        # The version is checked before anything else: a newer client's hello may have other fields.
        version = r.int("version", 0, MAX_ID)
        if version != PROTOCOL_VERSION:
            raise VersionError(f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})")
        return Hello(fingerprint=r.str("fingerprint", 128), split=r.int("split", 0, 1 << 16),
                     token=r.str("token", MAX_TEXT, default=""), client=r.str("client", 128, default=""),
                     version=version)
    if kind == "append":
        req_id, session, start, h = r.int("id"), r.session(), r.int("start", 0, MAX_POSITION), r.hidden()
        return Append(id=req_id, session=session, start=start, h=h, ack=r.bool("ack", default=True),
                      check=r.check(start, h.rows))
    if kind == "infer":
        req_id, session, start, h = r.int("id"), r.session(), r.int("start", 0, MAX_POSITION), r.hidden()
        return Infer(id=req_id, session=session, start=start, h=h, sampling=r.sampling(),
                     top_n=r.int("top_n", 0, MAX_TOP_N, default=0),
                     logprobs=r.int("logprobs", 0, MAX_TOP_N, default=None), mask=r.bytes("mask", default=None),
                     check=r.check(start, h.rows))
    if kind == "verify":
        req_id, session, start, h = r.int("id"), r.session(), r.int("start", 0, MAX_POSITION), r.hidden()
        draft = r.ints("draft", MAX_DRAFT)
        if len(draft) != h.rows - 1:
            raise BadFrame(f"verify: {len(draft)} draft tokens for {h.rows} rows (need rows - 1)")
        probs_raw = r.list("draft_probs", MAX_DRAFT, default=None)
        probs = None
        if probs_raw is not None:
            if len(probs_raw) != len(draft):
                raise BadFrame("verify.draft_probs must have one entry per draft token")
            probs = tuple(r.pairs(p, "verify.draft_probs[i]", 4096) for p in probs_raw)
            for i, (d, q) in enumerate(zip(draft, probs)):
                if not any(t == d and x > 0 for t, x in q):
                    raise BadFrame(f"verify.draft_probs[{i}] must give draft token {d} its probability (> 0)")
        masks_raw = r.list("masks", MAX_DRAFT + 1, default=None)
        if masks_raw is not None and (len(masks_raw) != h.rows or not all(isinstance(m, bytes) for m in masks_raw)):
            raise BadFrame("verify.masks must be one token mask (bytes) per row")
        return Verify(id=req_id, session=session, start=start, h=h, draft=draft, sampling=r.sampling(),
                      draft_probs=probs, logprobs=r.int("logprobs", 0, MAX_TOP_N, default=None),
                      masks=None if masks_raw is None else tuple(masks_raw))
    if kind == "truncate":
        return Truncate(id=r.int("id"), session=r.session(), length=r.int("length", 0, MAX_POSITION))
    if kind == "close":
        return Close(id=r.int("id"), session=r.session())
    if kind == "ping":
        return Ping(id=r.int("id"), stamp=r.float("stamp", -1e300, 1e300, default=0.0))
    if kind == "hello_ok":
        version = r.int("version", 0, MAX_ID)
        if version != PROTOCOL_VERSION:
            raise VersionError(f"server speaks protocol version {version}, this client {PROTOCOL_VERSION}")
        codecs = r.list("codecs", 16)
        if not all(isinstance(c, str) for c in codecs):
            raise BadFrame("hello_ok.codecs must be a list of strings")
        return HelloOk(server=r.str("server", 256), fingerprint=r.str("fingerprint", 128),
                       split=r.int("split", 0, 1 << 16), n_layers=r.int("n_layers", 0, 1 << 16),
                       hidden_size=r.int("hidden_size", 1, MAX_DIM), vocab_size=r.int("vocab_size", 1, 1 << 31),
                       max_frame=r.int("max_frame", 1), max_rows=r.int("max_rows", 1),
                       max_context=r.int("max_context", 1), session_ttl_s=r.float("session_ttl_s", 0, 1e12),
                       codecs=tuple(codecs), version=version)
    if kind == "ack":
        return Ack(id=r.int("id"), session=r.session(), length=r.int("length", 0, MAX_POSITION), **r.load())
    if kind == "token":
        return TokenReply(id=r.int("id"), session=r.session(), token=r.int("token", 0, 1 << 31),
                          length=r.int("length", 0, MAX_POSITION),
                          top=r.pairs(r.list("top", MAX_TOP_N, default=[]), "token.top", MAX_TOP_N),
                          logprob=None if r.d.get("logprob") is None else r.logprob(r.d["logprob"], "token.logprob"),
                          top_logprobs=None if r.d.get("top_logprobs") is None
                          else r.logprob_pairs(r.d["top_logprobs"], "token.top_logprobs"), **r.load())
    if kind == "verdict":
        accepted = r.int("accepted", 0, MAX_DRAFT)
        lps = tops = None
        if r.d.get("logprobs") is not None:
            lps = tuple(r.logprob(v, "verdict.logprobs[i]") for v in r.list("logprobs", accepted + 1))
            tops = tuple(r.logprob_pairs(t, "verdict.top_logprobs[i]")
                         for t in r.list("top_logprobs", accepted + 1, default=[]))
            if len(lps) != accepted + 1 or len(tops) not in (0, accepted + 1):
                raise BadFrame("verdict.logprobs / top_logprobs need one entry per settled token (accepted + 1)")
        return Verdict(id=r.int("id"), session=r.session(), accepted=accepted,
                       token=r.int("token", 0, 1 << 31), length=r.int("length", 0, MAX_POSITION),
                       logprobs=lps, top_logprobs=tops or None, **r.load())
    if kind == "pong":
        return Pong(id=r.int("id"), stamp=r.float("stamp", -1e300, 1e300, default=0.0))
    if kind == "error":
        return Error(code=r.str("code", 64), message=r.str("message", MAX_TEXT),
                     id=r.int("id", default=None), session=r.str("session", 128, default=None),
                     expected=r.int("expected", 0, MAX_POSITION, default=None),
                     retry_after=r.float("retry_after", 0, 1e6, default=None))
    if kind == "bye":
        return Bye(reason=r.str("reason", MAX_TEXT), retry_after=r.float("retry_after", 0, 1e6, default=1.0))
    raise BadFrame(f"unknown message kind {kind[:32]!r}")


def _peek_ids(raw: bytes) -> tuple[int | None, str | None]:
    """The id and session of an oversized frame, read without materialising its payload."""
    req_id = session = None
    try:
        u = msgpack.Unpacker(raw=False, max_buffer_size=len(raw) + 1)
        u.feed(raw)
        for _ in range(min(u.read_map_header(), 32)):
            key = u.unpack()
            if key == "id" or key == "session":
                v = u.unpack()
                if key == "id" and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_ID:
                    req_id = v
                elif key == "session" and isinstance(v, str) and SESSION_RE.fullmatch(v):
                    session = v
            else:
                u.skip()
    except Exception:  # a best effort on a frame we are rejecting anyway
        pass
    return req_id, session


def encode_frame(msg: Message) -> bytes:
    return msgpack.packb(msg.to_wire(), use_bin_type=True)


def decode_frame(raw: Any, max_frame: int = DEFAULT_MAX_FRAME) -> Message:
    """bytes -> Message, or a ProtocolError (BadFrame, TooLarge, VersionError) — nothing else.

    Errors carry the frame's request id and session when those could be read, so the
    sender can tell which request failed.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise BadFrame(f"expected a binary frame, got {type(raw).__name__}")
    if len(raw) > max_frame:
        req_id, session = _peek_ids(bytes(raw))
        raise TooLarge(f"frame of {len(raw)} bytes exceeds the {max_frame}-byte limit", req_id=req_id,
                       session=session)
    try:
        # unpackb bounds every container/string length by the buffer size (already <= max_frame)
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises ValueError, ExtraData, FormatError, StackError, ...
        raise BadFrame(f"not a msgpack frame: {type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise BadFrame(f"a frame must be a msgpack map, got {type(obj).__name__}")
    kind = obj.get("t")
    req_id = obj.get("id") if isinstance(obj.get("id"), int) and not isinstance(obj.get("id"), bool) else None
    session = obj.get("session") if isinstance(obj.get("session"), str) and SESSION_RE.fullmatch(obj["session"]) else None
    if req_id is not None and not 0 <= req_id <= MAX_ID:
        req_id = None
    if not isinstance(kind, str):
        raise BadFrame("a frame needs a string field 't' (the message kind)", req_id=req_id, session=session)
    try:
        return _parse(kind, _Reader(kind[:32], obj))
    except ProtocolError as e:
        e.req_id, e.session = req_id, session
        raise
    except Exception as e:  # defensive: a validation bug must still be a typed error
        raise BadFrame(f"{kind[:32]}: invalid frame ({type(e).__name__})", req_id=req_id, session=session) from None


def error_frame(e: ProtocolError) -> bytes:
    return encode_frame(Error.of(e))


__all__ = [
    "PROTOCOL_VERSION", "DEFAULT_MAX_FRAME", "Sampling", "GREEDY", "Message", "Hello", "HelloOk", "Append",
    "Infer", "Verify", "Truncate", "Close", "Ping", "Ack", "TokenReply", "Verdict", "Pong", "Error", "Bye",
    "encode_frame", "decode_frame", "error_frame", "ErrorCode", "ProtocolError",
]
