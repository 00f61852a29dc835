"""The log demultiplexer: framed and raw streams, timestamps, chunking, bounds. Pure."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.logs import LogDecoder, LogFormatError, LogLine, split_timestamp

T1 = "2026-12-04T15:57:39.123456789Z"
T2 = "2026-12-04T15:57:40.000000001Z"


def frame(stream: int, payload: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload


def decode(decoder: LogDecoder, chunks: list[bytes]) -> list[LogLine]:
    lines: list[LogLine] = []
    for chunk in chunks:
        lines += decoder.feed(chunk)
    return lines + decoder.close()


def in_pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


MIXED = (
    frame(1, b"out one\n")
    + frame(2, b"err one\n")
    + frame(1, b"out two\n")
    + frame(2, b"err two\n")
)
MIXED_LINES = [
    LogLine("stdout", None, "out one"),
    LogLine("stderr", None, "err one"),
    LogLine("stdout", None, "out two"),
    LogLine("stderr", None, "err two"),
]


def test_frames_are_separated_by_stream_in_order() -> None:
    """Frames of stdout and stderr give lines tagged with their stream, in wire order."""
    assert decode(LogDecoder(framed=True, timestamps=False), [MIXED]) == MIXED_LINES


def test_frames_fed_one_byte_at_a_time() -> None:
    """Headers and payloads cut at every byte still decode to the same lines."""
    chunks = [MIXED[i : i + 1] for i in range(len(MIXED))]
    assert decode(LogDecoder(framed=True, timestamps=False), chunks) == MIXED_LINES


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_chunking_gives_the_same_lines(cuts: list[int]) -> None:
    """Wherever the chunks are cut (timestamps included), the lines are the same."""
    data = frame(1, f"{T1} a\n".encode()) + frame(2, f"{T2} b\n".encode()) + MIXED
    want = decode(LogDecoder(framed=True, timestamps=True), [data])
    got = decode(LogDecoder(framed=True, timestamps=True), in_pieces(data, cuts))
    assert got == want
    assert want[:2] == [LogLine("stdout", T1, "a"), LogLine("stderr", T2, "b")]


def test_timestamps_are_split_off_each_frame() -> None:
    """With timestamps, the time goes to ``time`` and the text after the space to ``line``."""
    data = frame(1, f"{T1} hello world\n".encode()) + frame(2, f"{T2} \n".encode())
    assert decode(LogDecoder(framed=True, timestamps=True), [data]) == [
        LogLine("stdout", T1, "hello world"),
        LogLine("stderr", T2, ""),
    ]


def test_partial_messages_join_into_one_line_with_the_first_time() -> None:
    """A long line sent as several frames (each with a timestamp) is one line, timed by its start."""
    data = frame(1, f"{T1} first half ".encode()) + frame(1, f"{T2} second half\n".encode())
    assert decode(LogDecoder(framed=True, timestamps=True), [data]) == [
        LogLine("stdout", T1, "first half second half")
    ]


def test_interleaved_partial_lines_of_two_streams_do_not_mix() -> None:
    """stdout's unfinished line is kept apart while a stderr line completes."""
    data = frame(1, b"out ") + frame(2, b"err\n") + frame(1, b"done\n")
    assert decode(LogDecoder(framed=True, timestamps=False), [data]) == [
        LogLine("stderr", None, "err"),
        LogLine("stdout", None, "out done"),
    ]


def test_several_lines_in_one_frame_share_its_time() -> None:
    """A frame holding two lines gives two lines with the frame's time."""
    data = frame(1, f"{T1} a\nb\n".encode())
    assert decode(LogDecoder(framed=True, timestamps=True), [data]) == [
        LogLine("stdout", T1, "a"),
        LogLine("stdout", T1, "b"),
    ]


def test_last_line_without_newline_is_flushed_at_close() -> None:
    """A final line with no newline is reported when the stream ends; a cut header is dropped."""
    decoder = LogDecoder(framed=True, timestamps=False)
    assert decoder.feed(frame(2, b"no newline") + b"\x01\x00") == []
    assert decoder.close() == [LogLine("stderr", None, "no newline")]


def test_stdin_and_system_error_frames() -> None:
    """Stream 0 (stdin) counts as stdout, 3 (Docker's error) as stderr; others are refused."""
    data = frame(0, b"in\n") + frame(3, b"oops\n")
    assert decode(LogDecoder(framed=True, timestamps=False), [data]) == [
        LogLine("stdout", None, "in"),
        LogLine("stderr", None, "oops"),
    ]
    with pytest.raises(LogFormatError):
        LogDecoder(framed=True, timestamps=False).feed(b"hello, world\n")


def test_empty_frames_are_skipped() -> None:
    """A frame of size 0 yields nothing and does not disturb the next one."""
    data = frame(1, b"") + frame(1, b"x\n")
    assert decode(LogDecoder(framed=True, timestamps=True), [data]) == [
        LogLine("stdout", None, "x")
    ]


def test_raw_tty_stream_strips_carriage_returns() -> None:
    """A TTY stream is all stdout; the terminal's \\r before each newline is removed."""
    data = b"one\r\ntwo\r\nthree"
    assert decode(LogDecoder(framed=False, timestamps=False), in_pieces(data, [4, 5, 9])) == [
        LogLine("stdout", None, "one"),
        LogLine("stdout", None, "two"),
        LogLine("stdout", None, "three"),
    ]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_raw_tty_stream_with_timestamps_in_any_chunks(cuts: list[int]) -> None:
    """Each TTY line's own timestamp is split off, wherever the chunks are cut."""
    data = f"{T1} one\r\n{T2} two\r\n".encode()
    got = decode(LogDecoder(framed=False, timestamps=True), in_pieces(data, cuts))
    assert got == [LogLine("stdout", T1, "one"), LogLine("stdout", T2, "two")]


def test_text_that_is_not_a_timestamp_stays_in_the_line() -> None:
    """A frame that does not start with a timestamp keeps its text, with time null."""
    data = frame(1, b"not-a-time at all\n")
    assert decode(LogDecoder(framed=True, timestamps=True), [data]) == [
        LogLine("stdout", None, "not-a-time at all")
    ]
    assert split_timestamp(b"2026-12-04T15:57:39+02:00 x") == ("2026-12-04T15:57:39+02:00", b"x")


def test_long_lines_are_cut_to_the_bound() -> None:
    """A line beyond max_line_bytes is reported in pieces; an exact fit gives no empty extra line."""
    decoder = LogDecoder(framed=True, timestamps=False, max_line_bytes=4)
    assert decode(decoder, [frame(1, b"abcdefghij\n" + b"wxyz\n")]) == [
        LogLine("stdout", None, "abcd"),
        LogLine("stdout", None, "efgh"),
        LogLine("stdout", None, "ij"),
        LogLine("stdout", None, "wxyz"),
    ]


def test_invalid_utf8_is_replaced_and_json_is_one_line() -> None:
    """Bytes that are not UTF-8 become U+FFFD; each line serialises as one NDJSON object."""
    (line,) = decode(
        LogDecoder(framed=True, timestamps=False), [frame(1, b"caf\xe9 \xe2\x82\xac\n")]
    )
    assert line.line == "caf\ufffd \u20ac"
    encoded = line.to_json()
    assert encoded.endswith(b"\n") and encoded.count(b"\n") == 1
    assert json.loads(encoded) == {"stream": "stdout", "time": None, "line": "caf\ufffd \u20ac"}
