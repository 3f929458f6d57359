"""An upload's multipart/form-data body parsed as it arrives (the protocol document, section 2), without HTTP.

The `file` part goes straight into a file the caller opens once the part's name is known (so who sends it and
what it is named are checked before a byte of audio is kept), counted against the limit as it comes; the few
small fields stay in memory. Starlette's form parser would first spool the whole body into a temporary file
outside the data directory, which the disk floor does not watch, however large, before the route could refuse it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header

from birdflow.ingest_api.checks import Rejection

MAX_FIELDS = 8
MAX_FIELD_BYTES = 1024  # a listener id, a token: short
MAX_PART_HEADER_BYTES = 4096
FileOpener = Callable[[str, dict[str, str]], BinaryIO]  # (file name, fields before it) -> where its bytes go


def _bad_form(detail: str) -> Rejection:
    return Rejection(400, "bad_form", f"expected multipart/form-data with a 'file' field: {detail}")


MAX_BOUNDARY = 70  # RFC 2046, section 5.1.1


class UploadForm:
    """Feed it the body's chunks, then finish(); `fields` and `file_bytes` tell what came."""

    def __init__(self, content_type: str | None, open_file: FileOpener, limit_bytes: int):
        media, options = parse_options_header(content_type or "")
        if media != b"multipart/form-data" or not options.get(b"boundary"):
            raise _bad_form(f"Content-Type is {content_type or '(none)'}")
        if len(options[b"boundary"]) > MAX_BOUNDARY:
            raise _bad_form(f"a boundary of {len(options[b'boundary'])} characters (RFC 2046 allows {MAX_BOUNDARY})")
        self.fields: dict[str, str] = {}
        self.file_name: str | None = None
        self.file_bytes = 0
        self._open_file, self._limit = open_file, limit_bytes
        self._file: BinaryIO | None = None
        self._part_name: str | None = None
        self._part_is_file = False
        self._value = bytearray()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._parts = 0
        self._ended = False
        self._parser = MultipartParser(
            options[b"boundary"],
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda data, start, end: self._header_bytes(self._header_name, data[start:end]),
                "on_header_value": lambda data, start, end: self._header_bytes(self._header_value, data[start:end]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except Rejection:
            raise
        except Exception as exc:  # python-multipart's parse errors
            raise _bad_form(str(exc)) from None

    def finish(self) -> None:
        try:
            self._parser.finalize()
        except Exception as exc:
            raise _bad_form(str(exc)) from None
        if not self._ended:
            raise _bad_form("the body ended before the form's closing boundary")
        if self.file_name is None:
            raise _bad_form("missing the 'file' field")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_FIELDS + 1:
            raise _bad_form(f"more than {MAX_FIELDS} fields")
        self._part_name, self._part_is_file, self._disposition = None, False, b""
        self._value.clear()

    def _header_bytes(self, into: bytearray, data: bytes) -> None:
        if len(self._header_name) + len(self._header_value) + len(data) > MAX_PART_HEADER_BYTES:
            raise _bad_form(f"a part's header exceeds {MAX_PART_HEADER_BYTES} bytes")
        into.extend(data)

    def _header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise _bad_form("a part without a name")
        self._part_name = name.decode("utf-8", errors="replace")
        if self._part_name == "file":
            if self.file_name is not None:
                raise _bad_form("more than one 'file' field")
            self.file_name = options.get(b"filename", b"").decode("utf-8", errors="replace")
            self._part_is_file = True
            self._file = self._open_file(self.file_name, dict(self.fields))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._part_is_file:
            if len(self._value) + end - start > MAX_FIELD_BYTES:
                raise _bad_form(f"field {self._part_name!r} exceeds {MAX_FIELD_BYTES} bytes")
            self._value.extend(data[start:end])
            return
        self.file_bytes += end - start
        if self.file_bytes > self._limit:
            raise Rejection(413, "too_large", f"upload exceeds the limit of {self._limit} bytes")
        assert self._file is not None
        self._file.write(data[start:end])

    def _part_end(self) -> None:
        if self._part_is_file:
            self.close()
        elif self._part_name is not None:
            self.fields[self._part_name] = self._value.decode("utf-8", errors="replace")

    def _end(self) -> None:
        self._ended = True
