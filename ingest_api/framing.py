"""The listener stream's frames: 3-byte seq, 3-byte length (both little-endian), then the payload.

HTTP chunk boundaries have nothing to do with frame boundaries, so the parser keeps at most one
incomplete frame between feeds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from birdflow.core.errors import Refused

HEADER_BYTES = 6
SEQ_MODULUS = 1 << 24
METADATA_SEQ = 0xFFFFFF
START_SEQ = 0


class FramingError(Refused):
    """The stream cannot be resynchronised (a length beyond the limit)."""


@dataclass(frozen=True)
class Frame:
    seq: int
    payload: bytes


def encode_frame(seq: int, payload: bytes) -> bytes:
    if not 0 <= seq < SEQ_MODULUS or len(payload) >= SEQ_MODULUS:
        raise ValueError("seq and payload length must fit in 24 bits")
    return seq.to_bytes(3, "little") + len(payload).to_bytes(3, "little") + payload


class FrameParser:
    """Turns arbitrary byte chunks into frames."""

    def __init__(self, max_payload: int):
        self.max_payload = max_payload
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> Iterator[Frame]:
        self._buffer += chunk
        buffer = self._buffer
        start = 0
        try:
            while len(buffer) - start >= HEADER_BYTES:
                seq = int.from_bytes(buffer[start : start + 3], "little")
                length = int.from_bytes(buffer[start + 3 : start + 6], "little")
                if length > self.max_payload:
                    raise FramingError(f"frame length {length} exceeds the limit of {self.max_payload} bytes")
                end = start + HEADER_BYTES + length
                if end > len(buffer):
                    break
                yield Frame(seq, bytes(buffer[start + HEADER_BYTES : end]))
                start = end
        finally:
            del buffer[:start]

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame; non-zero when the client vanished mid-frame."""
        return len(self._buffer)
