"""``POST /v1/files``: a multipart upload streamed into the file store, a chunk at a time.

The body is parsed as it arrives (python-multipart's push parser); the file's
bytes go to Redis in chunks and the size limit is enforced while reading, so
neither memory nor disk ever holds the whole upload.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from jobs.files import BATCH_FILE_TTL, MAX_TTL, MIN_TTL, FileStore, FileWriter, StoredFile

from .errors import BadRequest, TooLarge
from .quotas import QuotaExceeded
from .params import declared_over, digits_value, shown

MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 16
# room for the multipart framing and the small fields around the file
FRAMING_SLACK = 64 * 1024
# RFC 2046 §5.1.1: a boundary is 1 to 70 characters (python-multipart fails on longer ones)
MAX_BOUNDARY = 70
PURPOSES = ("batch",)


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _Collector:
    """python-multipart callbacks: small fields in memory, the one file into a writer."""

    def __init__(self, files: FileStore, owner: str, max_bytes: int, room: int | None) -> None:
        self.files = files
        self.owner = owner
        self.max_bytes = max_bytes
        self.room = room
        self.fields: dict[str, str] = {}
        self.writer: FileWriter | None = None
        self.parts = 0
        self._part = _Part()
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._in_file = False

    def callbacks(self) -> dict[str, object]:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished}

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise BadRequest(f"a file upload has at most {MAX_PARTS} form fields")
        self._part = _Part()
        self._disposition = b""
        self._in_file = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise BadRequest("a form part has no name in its Content-Disposition")
        self._part.name = options[b"name"].decode("utf-8", errors="replace")
        if b"filename" in options:
            if self._part.name != "file" or self.writer is not None:
                raise BadRequest("send exactly one file, in the form field 'file'", param="file")
            filename = posixpath.basename(options[b"filename"].decode("utf-8", errors="replace")
                                          .replace("\\", "/"))[:255] or "upload.jsonl"
            self.writer = FileWriter(self.files, self.owner, filename, "batch")
            self._in_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            assert self.writer is not None
            if self.writer.size + (end - start) > self.max_bytes:
                raise TooLarge(f"the file is larger than this server's limit of {self.max_bytes} bytes "
                               "(AIVVM_BATCH_MAX_UPLOAD_BYTES)", param="file")
            if self.room is not None and self.writer.size + (end - start) > self.room:
                raise QuotaExceeded(f"this file would take the key past its quota of bytes stored ({self.room:,} "
                                    "bytes left; delete files, or let them expire)", retry_after=60)
            self.writer.add(data[start:end])
        else:
            if len(self._part.data) + (end - start) > MAX_FIELD_BYTES:
                raise BadRequest(f"the form field {self._part.name!r} is too long", param=self._part.name)
            self._part.data += data[start:end]

    def on_part_end(self) -> None:
        if not self._in_file:
            self.fields[self._part.name] = self._part.data.decode("utf-8", errors="replace")


async def receive_upload(request: Request, files: FileStore, owner: str, max_bytes: int,
                         room: int | None = None) -> StoredFile:
    """The uploaded file, stored; over ``max_bytes`` a 413, over ``room`` (what the owner's quota of
    bytes stored leaves) a 429, both while reading, whatever the request said its length was."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise BadRequest("upload a file as multipart/form-data with the fields 'file' and 'purpose'")
    if not 1 <= len(params[b"boundary"]) <= MAX_BOUNDARY:
        raise BadRequest(f"the multipart boundary must be 1 to {MAX_BOUNDARY} characters (RFC 2046)")
    if declared_over(request.headers.get("content-length"), max_bytes + FRAMING_SLACK):
        raise TooLarge(f"the file is larger than this server's limit of {max_bytes} bytes "
                       "(AIVVM_BATCH_MAX_UPLOAD_BYTES)", param="file")
    collector = _Collector(files, owner, max_bytes, room)
    parser = MultipartParser(params[b"boundary"], collector.callbacks(),  # type: ignore[arg-type]
                             max_size=max_bytes + FRAMING_SLACK)
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            writer = collector.writer
            if writer is not None and writer.full:
                await anyio.to_thread.run_sync(writer.push_full)
        parser.finalize()
        writer = collector.writer
        if writer is None:
            raise BadRequest("the form has no file: send it in the field 'file'", param="file")
        purpose = collector.fields.get("purpose")
        if purpose not in PURPOSES:
            raise BadRequest(f"purpose must be 'batch', got {shown(purpose)}", param="purpose")
        writer.ttl = expires_after(collector.fields)
        return await anyio.to_thread.run_sync(writer.commit)
    except FormParserError as exc:
        await _abort(collector)
        raise BadRequest(f"the multipart body cannot be read: {exc}") from exc
    except (Exception, ClientDisconnect):
        await _abort(collector)
        raise


def expires_after(fields: dict[str, str]) -> int:
    """Seconds a batch file lives: its form's ``expires_after`` (as the SDK sends it:
    ``expires_after[anchor]``, ``expires_after[seconds]``), by default 30 days, as OpenAI's."""
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return BATCH_FILE_TTL
    if anchor != "created_at":
        raise BadRequest(f"expires_after[anchor] must be 'created_at', got {shown(anchor)}",
                         param="expires_after.anchor")
    value = None if seconds is None else digits_value(seconds, MAX_TTL)
    if value is None or not MIN_TTL <= value <= MAX_TTL:
        raise BadRequest(f"expires_after[seconds] must be a whole number from {MIN_TTL} to {MAX_TTL}, "
                         f"got {shown(seconds)}", param="expires_after.seconds")
    return value


async def _abort(collector: _Collector) -> None:
    if collector.writer is not None:
        await anyio.to_thread.run_sync(collector.writer.abort)
