"""Docker's container log streams turned into lines. Pure: bytes in, lines out.

Two wire formats come back from ``GET /containers/{id}/logs``:

* **Framed** (a container without a TTY): a sequence of frames, each an 8-byte
  header ``[stream, 0, 0, 0, size (4 bytes, big-endian)]`` and ``size`` bytes of
  payload. Stream 1 is stdout, 2 is stderr (0, stdin, is written on stdout and 3
  is Docker's own error on the stream, reported as stderr). Docker writes one log
  message per frame; with ``timestamps=1`` every frame starts with the message's
  time, ``2006-01-02T15:04:05.999999999Z`` and a space. A line longer than the log
  driver's buffer (16 KiB for json-file) arrives as several frames, each with its
  own timestamp, only the last ending in a newline.
* **Raw** (a container with a TTY): the bytes as the terminal wrote them, stdout and
  stderr already merged by the terminal, so everything is ``stdout``; lines end in
  ``\\r\\n``. With timestamps every line starts with one.

:class:`LogDecoder` is fed chunks exactly as they come off the connection (a frame
header or a timestamp may be cut anywhere) and returns the complete lines found so
far, in the order their last byte arrived. Each stream keeps its own partial line,
so interleaved frames of stdout and stderr never mix. A line's ``time`` is the
timestamp of its first piece (None without timestamps); the newline, and in raw
mode the terminal's ``\\r``, are not part of ``line``. Text is decoded as UTF-8,
invalid bytes replaced.

Memory is bounded: a line that grows beyond ``max_line_bytes`` without a newline is
cut, and the piece reported as a line of its own; the rest continues as the next
line, with the same time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from supervisor.cache import dumps

__all__ = ["MAX_LINE_BYTES", "LogDecoder", "LogFormatError", "LogLine"]

Stream = Literal["stdout", "stderr"]

#: The longest line reported whole; longer ones are cut into pieces of this size.
MAX_LINE_BYTES: Final = 64 * 1024
_HEADER_BYTES: Final = 8
#: A timestamp and its space take 36 bytes in Docker's fixed format; this leaves room for offsets.
_MAX_TIMESTAMP_BYTES: Final = 48
_STREAMS: Final[dict[int, Stream]] = {0: "stdout", 1: "stdout", 2: "stderr", 3: "stderr"}
_TIMESTAMP: Final = re.compile(
    rb"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?(?:Z|[+-][0-9]{2}:[0-9]{2})"
)


class LogFormatError(ValueError):
    """The bytes are not a framed log stream (a header names no known stream)."""


@dataclass(frozen=True, slots=True)
class LogLine:
    stream: Stream
    time: str | None
    line: str

    def to_json(self) -> bytes:
        """One NDJSON line: ``{"stream": ..., "time": ..., "line": ...}`` and a newline."""
        return dumps({"stream": self.stream, "time": self.time, "line": self.line}) + b"\n"


def split_timestamp(text: bytes) -> tuple[str | None, bytes]:
    """``(time, rest)`` when ``text`` starts with a Docker timestamp and a space, else ``(None, text)``."""
    space = text.find(b" ", 0, _MAX_TIMESTAMP_BYTES)
    if space > 0 and _TIMESTAMP.fullmatch(text, 0, space):
        return text[:space].decode("ascii"), text[space + 1 :]
    return None, text


class _Lines:
    """The partial line of one stream, and the lines completed by each new piece."""

    def __init__(self, stream: Stream, *, max_line_bytes: int, strip_cr: bool) -> None:
        self.stream: Stream = stream
        self.max_line_bytes = max_line_bytes
        self._strip_cr = strip_cr
        self._pending = bytearray()
        self._time: str | None = None
        #: A line has begun and not ended (its pending bytes may be empty after a cut).
        self.open = False
        #: The open line has been cut: an empty remainder is not a line of its own.
        self._cut = False

    def push(self, data: bytes, time: str | None, out: list[LogLine]) -> None:
        if not self.open:
            self._time = time
            self.open = True
        start = 0
        while True:
            newline = data.find(b"\n", start)
            if newline == -1:
                break
            self._pending += data[start:newline]
            self._cut_to_bound(out)
            if self._pending or not self._cut:
                self._emit(out)
            start = newline + 1
            self.open = self._cut = False
            if start < len(data):  # more in this piece: the next line began at the same time
                self._time = time
                self.open = True
        self._pending += data[start:]
        self._cut_to_bound(out)

    def _cut_to_bound(self, out: list[LogLine]) -> None:
        while len(self._pending) >= self.max_line_bytes:
            piece = bytes(self._pending[: self.max_line_bytes])
            del self._pending[: self.max_line_bytes]
            out.append(LogLine(self.stream, self._time, self._decode(piece)))
            self._cut = True

    def flush(self, out: list[LogLine]) -> None:
        if self._pending:
            self._emit(out)
        self.open = self._cut = False

    def _emit(self, out: list[LogLine]) -> None:
        text = bytes(self._pending)
        self._pending.clear()
        if self._strip_cr and text.endswith(b"\r"):
            text = text[:-1]
        out.append(LogLine(self.stream, self._time, self._decode(text)))

    @staticmethod
    def _decode(text: bytes) -> str:
        return text.decode("utf-8", "replace")


class LogDecoder:
    """Feed it a log stream in chunks (:meth:`feed`), then :meth:`close` it; see the module docstring."""

    def __init__(
        self, *, framed: bool, timestamps: bool, max_line_bytes: int = MAX_LINE_BYTES
    ) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be at least 1")
        self.framed = framed
        self.timestamps = timestamps
        self._buffer = bytearray()
        self._lines: dict[Stream, _Lines] = {
            name: _Lines(name, max_line_bytes=max_line_bytes, strip_cr=not framed)
            for name in ("stdout", "stderr")
        }
        # Framed: the frame being read, and the head kept until its timestamp is complete.
        self._stream: Stream = "stdout"
        self._remaining = 0
        self._head: bytearray | None = None
        self._frame_time: str | None = None

    def feed(self, data: bytes) -> list[LogLine]:
        """The lines completed by ``data``; raises :class:`LogFormatError` on a bad frame header."""
        out: list[LogLine] = []
        if self.framed:
            self._buffer += data
            self._feed_frames(out)
        else:
            self._feed_raw(data, out)
        return out

    def close(self) -> list[LogLine]:
        """The end of the stream: the last lines that had no newline (a cut frame is dropped)."""
        out: list[LogLine] = []
        if self.framed:
            if self._head:
                self._push_head(out)
        elif self._buffer:
            self._feed_raw_line(bytes(self._buffer), out)
            self._buffer.clear()
        for lines in self._lines.values():
            lines.flush(out)
        return out

    # -- framed ----------------------------------------------------------------------

    def _feed_frames(self, out: list[LogLine]) -> None:
        buffer = self._buffer
        while True:
            if self._remaining == 0:
                if len(buffer) < _HEADER_BYTES:
                    return
                kind = buffer[0]
                stream = _STREAMS.get(kind)
                if stream is None or buffer[1:4] != b"\0\0\0":
                    raise LogFormatError(
                        f"not a log frame header: {bytes(buffer[:_HEADER_BYTES])!r}"
                    )
                self._stream = stream
                self._remaining = int.from_bytes(buffer[4:_HEADER_BYTES], "big")
                del buffer[:_HEADER_BYTES]
                self._head = bytearray() if self.timestamps else None
                self._frame_time = None
                continue
            if not buffer:
                return
            piece = bytes(buffer[: self._remaining])
            del buffer[: len(piece)]
            self._remaining -= len(piece)
            if self._head is not None:
                self._head += piece
                complete = (
                    self._remaining == 0
                    or b" " in self._head
                    or len(self._head) >= _MAX_TIMESTAMP_BYTES
                )
                if complete:
                    self._push_head(out)
                continue
            self._lines[self._stream].push(piece, self._frame_time, out)

    def _push_head(self, out: list[LogLine]) -> None:
        assert self._head is not None
        self._frame_time, rest = split_timestamp(bytes(self._head))
        self._head = None
        self._lines[self._stream].push(rest, self._frame_time, out)

    # -- raw (TTY) -------------------------------------------------------------------

    def _feed_raw(self, data: bytes, out: list[LogLine]) -> None:
        if not self.timestamps:
            self._lines["stdout"].push(data, None, out)
            return
        # Each line starts with its own timestamp: cut at newlines first.
        self._buffer += data
        start = 0
        while (newline := self._buffer.find(b"\n", start)) != -1:
            self._feed_raw_line(bytes(self._buffer[start : newline + 1]), out)
            start = newline + 1
        del self._buffer[:start]
        if len(self._buffer) >= self._lines["stdout"].max_line_bytes:
            # A long line without a newline yet: hand over what we have (bounded memory).
            self._feed_raw_line(bytes(self._buffer), out)
            self._buffer.clear()

    def _feed_raw_line(self, text: bytes, out: list[LogLine]) -> None:
        lines = self._lines["stdout"]
        time = None
        if not lines.open:
            time, text = split_timestamp(text)
        lines.push(text, time, out)
