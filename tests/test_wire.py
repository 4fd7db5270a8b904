"""The wire package alone: message schema round trips, codec error, and validation that
turns any input into a message or a typed ProtocolError (hypothesis-driven). Torch-free."""

from __future__ import annotations

import subprocess

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fogline.wire import (Ack, Append, BadFrame, Bye, Close, Codec, Error, ErrorCode, Hello, HelloOk, Infer,
                          Ping, Pong, PositionGap, ProtocolError, Sampling, TokenReply, TooLarge, Truncate,
                          UnknownSession, Verdict, Verify, VersionError, decode_frame, decode_hidden, encode_frame,
                          encode_hidden, error_from_code)
from fogline.wire.errors import FATAL_CODES, Overloaded

RNG = np.random.default_rng(0)
H = encode_hidden(RNG.standard_normal((3, 64)).astype(np.float32), "fp16")


def all_messages():
    h8 = encode_hidden(RNG.standard_normal((2, 70)).astype(np.float32), "int8", 32)
    return [
        Hello(fingerprint="ab" * 32, split=20, token="tok", client="pi-1"),
        HelloOk(server="fogline-cloud/0.1", fingerprint="ab" * 32, split=20, n_layers=30, hidden_size=576,
                vocab_size=49152, max_frame=1 << 20, max_rows=4096, max_context=8192, session_ttl_s=900.0,
                codecs=("fp16", "int8")),
        Append(id=1, session="s-1", start=0, h=H, ack=False),
        Infer(id=2, session="s-1", start=3, h=h8, sampling=Sampling(0.7, 0.9, 40, 123), top_n=5),
        Infer(id=3, session="s-1", start=3, h=H),
        Verify(id=4, session="s:2", start=9, h=H, draft=(5, 6), sampling=Sampling(1.0, seed=1),
               draft_probs=(((5, 0.5), (7, 0.25)), ((6, 1.0),))),
        Truncate(id=5, session="s.3", length=7),
        Close(id=6, session="s.3"),
        Ping(id=7, stamp=12.5),
        Ack(id=1, session="s-1", length=3),
        TokenReply(id=2, session="s-1", token=42, length=5, top=((42, 0.75), (7, 0.125))),
        Verdict(id=4, session="s:2", accepted=1, token=8, length=11),
        Pong(id=7, stamp=12.5),
        Error(code="position_gap", message="holds 4", id=3, session="s-1", expected=4),
        Error(code="overloaded", message="busy", retry_after=0.5),
        Bye(reason="maintenance", retry_after=2.0),
    ]


@pytest.mark.parametrize("msg", all_messages(), ids=lambda m: m.KIND)
def test_every_message_round_trips(msg):
    assert decode_frame(encode_frame(msg)) == msg


def test_codec_round_trip_error():
    """fp32 exact, fp16 ~1e-4 relative, int8 ~1e-2 and better with smaller blocks; heavy tails too."""
    x = RNG.standard_normal((16, 576)).astype(np.float32)
    x[:, 7] *= 300.0  # a "massive activation" column, as real residual streams have
    errs = {}
    for codec, block in (("fp32", 64), ("fp16", 64), ("int8", 128), ("int8", 64), ("int8", 16)):
        f = encode_hidden(x, codec, block)
        y = decode_hidden(f)
        assert y.shape == x.shape and y.dtype == np.float32
        errs[(codec, block)] = float(np.linalg.norm(y - x) / np.linalg.norm(x))
    assert errs[("fp32", 64)] == 0.0
    assert errs[("fp16", 64)] < 1e-3
    # the outlier column inflates its block's scale: smaller blocks confine the damage
    assert errs[("int8", 16)] < errs[("int8", 64)] < errs[("int8", 128)] < 3e-2
    # bytes per value: 4, 2, ~1.06
    assert encode_hidden(x, "fp16").nbytes == x.size * 2
    assert encode_hidden(x, "int8", 64).nbytes == x.size + 16 * 9 * 4


def test_int8_odd_dims_zero_blocks_and_fp16_clipping():
    x = np.zeros((2, 70), np.float32)
    x[1, 69] = 3.0
    y = decode_hidden(encode_hidden(x, "int8", 32))  # 70 = 2 full blocks + a partial one, zero blocks
    np.testing.assert_allclose(y, x, atol=1e-6)
    big = np.full((1, 4), 1e6, np.float32)
    assert np.all(decode_hidden(encode_hidden(big, "fp16")) == 65504.0)
    with pytest.raises(ValueError):
        encode_hidden(np.array([[np.nan]], np.float32))


def test_inconsistent_payloads_are_bad_frames():
    f = encode_hidden(RNG.standard_normal((2, 8)).astype(np.float32), "int8", 4)
    for bad in (dict(rows=3), dict(dim=9), dict(block=8), dict(data=f.data[:-1]), dict(scales=b""),
                dict(codec="bf16")):
        obj = msgpack.unpackb(encode_frame(Infer(id=1, session="s", start=0, h=f)))
        obj["h"].update(bad)
        with pytest.raises(BadFrame):
            decode_hidden(decode_frame(msgpack.packb(obj)).h)  # type: ignore[union-attr]
    nan = np.frombuffer(np.array([np.nan], "<f4").tobytes() * 8, np.uint8).tobytes()
    obj = msgpack.unpackb(encode_frame(Infer(id=1, session="s", start=0, h=encode_hidden(np.zeros((1, 8)), "fp32"))))
    obj["h"]["data"] = nan
    with pytest.raises(BadFrame, match="NaN"):
        decode_hidden(decode_frame(msgpack.packb(obj)).h)  # type: ignore[union-attr]


def test_validation_errors_are_typed_and_name_the_request():
    obj = Infer(id=77, session="s-1", start=0, h=H).to_wire()
    obj["start"] = "zero"
    with pytest.raises(BadFrame) as e:
        decode_frame(msgpack.packb(obj, use_bin_type=True))
    assert e.value.req_id == 77 and e.value.session == "s-1" and "infer.start" in str(e.value)
    with pytest.raises(TooLarge):
        decode_frame(b"\x00" * 2000, max_frame=1000)
    with pytest.raises(BadFrame, match="binary"):
        decode_frame("text")  # type: ignore[arg-type]
    with pytest.raises(BadFrame, match="unknown message kind"):
        decode_frame(msgpack.packb({"t": "launch_missiles", "id": 1}))
    v = Verify(id=1, session="s", start=0, h=H, draft=(1,)).to_wire()  # 3 rows need 2 drafts
    with pytest.raises(BadFrame, match="rows - 1"):
        decode_frame(msgpack.packb(v, use_bin_type=True))
    with pytest.raises(BadFrame, match="session"):
        decode_frame(msgpack.packb({"t": "close", "id": 1, "session": "bad session\n"}))


def test_a_newer_hello_is_a_version_error_not_a_bad_frame():
    with pytest.raises(VersionError):
        decode_frame(msgpack.packb({"t": "hello", "version": 2, "something_new": [1, 2]}))


def test_error_codes_map_to_exception_classes():
    for code in ErrorCode:
        e = error_from_code(code.value, "m", req_id=1, expected=4, retry_after=0.5)
        assert isinstance(e, ProtocolError) and e.code == code
        assert e.fatal == (code in FATAL_CODES)
        back = decode_frame(encode_frame(Error.of(e)))
        assert isinstance(back, Error) and back.code == code.value and back.expected == 4
    assert isinstance(error_from_code("position_gap", "x"), PositionGap)
    assert isinstance(error_from_code("unknown_session", "x"), UnknownSession)
    assert error_from_code("overloaded", "x").recoverable and isinstance(error_from_code("overloaded", "x"), Overloaded)
    assert not error_from_code("auth", "x").recoverable
    assert str(error_from_code("bad_frame", "two\nlines")) == "two lines"  # one line, always


# --- fuzzing: nothing but Message or ProtocolError ------------------------------------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20)
KINDS = ["hello", "append", "infer", "verify", "truncate", "close", "ping", "hello_ok", "ack", "token",
         "verdict", "pong", "error", "bye", "nope"]
FIELDS = ["id", "session", "start", "h", "ack", "sampling", "top_n", "draft", "draft_probs", "length", "stamp",
          "version", "fingerprint", "split", "token", "codec", "rows", "dim", "data", "scales", "block"]


def _decode_ok_or_typed(raw) -> None:
    try:
        decode_frame(raw, max_frame=1 << 16)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(raw):
    _decode_ok_or_typed(raw)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(KINDS), st.dictionaries(st.sampled_from(FIELDS), msgpack_values, max_size=8))
def test_fuzz_structured_maps(kind, fields):
    _decode_ok_or_typed(msgpack.packb({"t": kind, **fields}, use_bin_type=True))


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(all_messages()), st.data())
def test_fuzz_mutated_valid_frames(msg, data):
    obj = msg.to_wire()
    key = data.draw(st.sampled_from(sorted(obj)))
    action = data.draw(st.sampled_from(["drop", "replace", "nested"]))
    if action == "drop":
        del obj[key]
    elif action == "replace":
        obj[key] = data.draw(msgpack_values)
    elif isinstance(obj[key], dict) and obj[key]:
        inner = data.draw(st.sampled_from(sorted(obj[key])))
        obj[key][inner] = data.draw(msgpack_values)
    raw = msgpack.packb(obj, use_bin_type=True)
    _decode_ok_or_typed(raw)
    cut = data.draw(st.integers(0, len(raw)))
    _decode_ok_or_typed(raw[:cut])  # truncated msgpack


def test_wire_and_client_import_without_torch(python_exe, subprocess_env):
    code = ("import sys; import fogline.wire, edge_runtime.cloud_client, edge_runtime.cloud_generation; "
            "bad = [m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([python_exe, "-c", code], env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"torch-free modules imported {r.stdout.strip()} {r.stderr[-300:]}"


def test_codec_enum_is_what_frames_carry():
    assert {c.value for c in Codec} == {"fp32", "fp16", "int8"}


def test_logprob_fields_round_trip_and_a_q_without_its_draft_is_refused():
    """Issue 12: cloud logprobs travel in token/verdict; a verify's q must hold its own draft."""
    from fogline.wire.protocol import TokenReply, Verdict, Verify

    for m in (Infer(id=2, session="s", start=0, h=H, logprobs=3),
              Verify(id=4, session="s", start=0, h=H, draft=(5, 6), logprobs=0,
                     sampling=Sampling(1.0), draft_probs=(((5, 0.5),), ((6, 1.0),))),
              TokenReply(id=2, session="s", token=4, length=1, logprob=-0.25, top_logprobs=((4, -0.25),)),
              Verdict(id=4, session="s", accepted=1, token=3, length=2, logprobs=(-0.5, -1.0),
                      top_logprobs=(((5, -0.5),), ((3, -1.0),)))):
        assert decode_frame(encode_frame(m)) == m
    bad = Verify(id=4, session="s", start=0, h=H, draft=(5, 6), sampling=Sampling(1.0),
                 draft_probs=(((7, 0.5),), ((6, 1.0),)))
    with pytest.raises(BadFrame, match="draft token 5"):
        decode_frame(encode_frame(bad))
    short = Verdict(id=4, session="s", accepted=1, token=3, length=2, logprobs=(-0.5,))
    with pytest.raises(BadFrame):
        decode_frame(encode_frame(short))


def test_load_and_agreement_check_fields_round_trip_and_are_validated():
    """Issue 12.5: replies carry the cloud's queue/step times and check counts; an append or
    infer's checks must name rows of its own frame, ascending, with token ids."""
    for m in (Append(id=1, session="s", start=4, h=H, ack=False, check=((4, 7), (6, 9))),
              Infer(id=2, session="s", start=4, h=H, check=((5, 1),)),
              Ack(id=1, session="s", length=7, queue_ms=0.5, step_ms=12.25, checked=3, agreed=2),
              TokenReply(id=2, session="s", token=4, length=8, queue_ms=0.0, step_ms=9.0),
              Verdict(id=4, session="s", accepted=1, token=3, length=2, step_ms=20.0, checked=1, agreed=0)):
        assert decode_frame(encode_frame(m)) == m
    for check, why in ((((3, 7),), "not a row of this frame"), (((7, 7),), "not a row of this frame"),
                       (((5, 1), (5, 2)), "ascending and distinct"), (((6, 1), (5, 2)), "ascending"),
                       (((5, -1),), "not a token id"), (((5,),), r"\[position, token\] pairs")):
        raw = Infer(id=2, session="s", start=4, h=H).to_wire()
        raw["check"] = [list(c) for c in check]
        with pytest.raises(BadFrame, match=why):
            decode_frame(msgpack.packb(raw, use_bin_type=True))
    for extra in ({"checked": 2}, {"checked": 1, "agreed": 2}, {"step_ms": -1.0}):
        raw = {**TokenReply(id=2, session="s", token=4, length=8).to_wire(), **extra}
        with pytest.raises(BadFrame):
            decode_frame(msgpack.packb(raw, use_bin_type=True))
