"""The control framer: every malformed frame is a one-line ProtocolError, never a crash."""

from __future__ import annotations

import json
import struct

import pytest
from pydantic import BaseModel, Field, ValidationError

from trustmig.agent.control import validation_line
from trustmig.agent.protocol import MAX_DEPTH, FrameDecoder, ProtocolError, encode


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_round_trip_byte_by_byte() -> None:
    data = encode({"id": 1, "op": "ping", "params": {"a": [1, {"b": None}]}})
    dec = FrameDecoder()
    out = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
    assert out == [{"v": 1, "id": 1, "op": "ping", "params": {"a": [1, {"b": None}]}}]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (frame(b"{not json"), "control frame is not JSON"),
        (frame(b"\xff\xfe"), "control frame is not JSON"),
        (frame(b"[1, 2]"), "control frame must be a JSON object"),
        (frame(b'{"v": 9, "op": "ping"}'), "unsupported control protocol version 9"),
        (frame(b'{"op": "ping"}'), "unsupported control protocol version None"),
        (struct.pack(">I", 0xFFFFFFFF), "exceeds the 4194304 limit"),
        (frame(b'{"v":1,"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nests deeper"),
        (frame(b'{"v":1,"a":' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}"), "deeper"),
    ],
)
def test_malformed_frames_are_one_line_errors(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as err:
        FrameDecoder().feed(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_nesting_up_to_the_limit_is_fine() -> None:
    depth = MAX_DEPTH - 1  # the frame's own object is one level
    body = '{"v":1,"a":' + "[" * depth + "]" * depth + "}"
    assert FrameDecoder().feed(frame(body.encode()))[0]["v"] == 1


class Spec(BaseModel):
    memory_mib: int = Field(ge=64)
    mode: str


def test_validation_errors_name_the_field_and_what_was_sent() -> None:
    with pytest.raises(ValidationError) as err:
        Spec.model_validate({"memory_mib": 1, "mode": 3})
    line = validation_line("vm.start", err.value)
    assert line == (
        "vm.start: field memory_mib: Input should be greater than or equal to 64, got 1 "
        "(and 1 more)"
    )
    with pytest.raises(ValidationError) as err:
        Spec.model_validate_json(json.dumps({"memory_mib": "x" * 200, "mode": "a"}))
    assert validation_line("vm.start", err.value).endswith("...")
