"""The OpenAPI 3.1 description of serve's own API, published at ``GET /openapi.json``.

OpenAI's /v1/files and /v1/batches as this server answers them: the parameters and bounds the
handlers check (:mod:`.params`, :mod:`.upload`, :mod:`.batches_api`), the File and Batch objects
they return (``StoredFile.to_api``, ``ApiBatch.to_api``) and the error form of :mod:`.errors`.
A fuzzer reads it to send requests both inside and outside these bounds (no answer is a 5xx).
"""

from __future__ import annotations

from typing import Any

from jobs.endpoints import Endpoint
from jobs.files import MAX_TTL, MIN_TTL
from jobs.records import MAX_PRIORITY

from .batches_api import WINDOWS
from .params import MAX_IDEMPOTENCY_KEY, MAX_METADATA_KEY, MAX_METADATA_PAIRS, MAX_METADATA_VALUE
from .records import TIMESTAMPS, ApiStatus
from .upload import MAX_FIELD_BYTES, MAX_PARTS, PURPOSES

Schema = dict[str, Any]

ERRORS = {
    400: "The request is not valid (the error's param names what is at fault)",
    401: "No API key, or an unknown one",
    403: "A cross-site request, or (without keys) a host that is not loopback",
    404: "No such object for this key (another key's objects are not found either)",
    408: "The client stopped sending its body",
    409: "A request with the same Idempotency-Key is under way",
    413: "The body or the file is over this server's limit",
    429: "Over a per-key limit or quota (see Retry-After)",
    503: "The batch store (Redis) is unreachable: try again",
}
# what every authenticated request may meet, whatever the operation
COMMON_ERRORS = (401, 403, 408, 503)


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Schema], *, optional: tuple[str, ...] = (), closed: bool = True) -> Schema:
    """An object whose properties are all required but ``optional``; ``closed``: and no other (what
    serve answers; what it reads may hold more, which it ignores)."""
    schema: Schema = {"type": "object", "properties": properties,
                      "required": [name for name in properties if name not in optional]}
    if closed:
        schema["additionalProperties"] = False
    return schema


def _list_of(item: str) -> Schema:
    """OpenAI's page of a list (:func:`.endpoint.list_object`)."""
    return _object({"object": {"const": "list"}, "data": {"type": "array", "items": _ref(item)},
                    "first_id": _nullable({"type": "string"}), "last_id": _nullable({"type": "string"}),
                    "has_more": {"type": "boolean"}})


def _deleted(kind: str) -> Schema:
    return _object({"id": {"type": "string"}, "object": {"const": kind}, "deleted": {"const": True}})


# a new file's form fields, as the SDK names them
EXPIRES_ANCHOR, EXPIRES_SECONDS = "expires_after[anchor]", "expires_after[seconds]"
TIMESTAMP: Schema = {"type": "integer", "minimum": 0}
TTL: Schema = {"type": "integer", "minimum": MIN_TTL, "maximum": MAX_TTL}

SCHEMAS: dict[str, Schema] = {
    "Error": _object({"error": _object({
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": _nullable({"type": "string"}), "code": _nullable({"type": "string"})})}),
    "File": _object({
        "id": {"type": "string"}, "object": {"const": "file"}, "bytes": {"type": "integer", "minimum": 0},
        "created_at": TIMESTAMP, "filename": {"type": "string"},
        "purpose": {"enum": [*PURPOSES, "batch_output"]}, "status": {"const": "processed"},
        "expires_at": _nullable(TIMESTAMP), "status_details": {"type": "null"}}),
    "FileList": _list_of("File"),
    "FileDeleted": _deleted("file"),
    "Metadata": _nullable({
        "type": "object", "maxProperties": MAX_METADATA_PAIRS,
        "propertyNames": {"maxLength": MAX_METADATA_KEY},
        "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE},
        "properties": {"priority": {
            "type": "string", "pattern": f"^([1-9]|{MAX_PRIORITY})$",
            "description": f"The batch's share of the workers, 1 to {MAX_PRIORITY} (an aivvm-batch extension)"}}}),
    "BatchError": _object({"code": {"type": "string"}, "message": {"type": "string"},
                           "param": _nullable({"type": "string"}), "line": _nullable({"type": "integer"})}),
    "Batch": _object({
        "id": {"type": "string"}, "object": {"const": "batch"}, "endpoint": {"type": "string"},
        "errors": _nullable(_object({"object": {"const": "list"},
                                     "data": {"type": "array", "items": _ref("BatchError")}})),
        "input_file_id": {"type": "string"}, "completion_window": {"type": "string"},
        "status": {"enum": [s.value for s in ApiStatus]},
        "output_file_id": _nullable({"type": "string"}), "error_file_id": _nullable({"type": "string"}),
        "created_at": TIMESTAMP, "expires_at": TIMESTAMP,
        "request_counts": _object({name: {"type": "integer", "minimum": 0}
                                   for name in ("total", "completed", "failed")}),
        "metadata": _ref("Metadata"), "model": {"type": ["string", "null"]},
        "usage": _object({
            "input_tokens": {"type": "integer"}, "output_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
            "input_tokens_details": _object({"cached_tokens": {"type": "integer"}}),
            "output_tokens_details": _object({"reasoning_tokens": {"type": "integer"}})}),
        **{name: _nullable(TIMESTAMP) for name in TIMESTAMPS}}),
    "BatchList": _list_of("Batch"),
    "BatchDeleted": _deleted("batch.deleted"),
    "NewBatch": _object({
        "input_file_id": {"type": "string", "minLength": 1,
                          "description": "The id of a file uploaded with purpose 'batch'"},
        "endpoint": {"enum": [e.value for e in Endpoint]},
        "completion_window": {"enum": list(WINDOWS)},
        "metadata": _ref("Metadata"),
        "output_expires_after": _nullable(_object({"anchor": {"const": "created_at"}, "seconds": TTL},
                                                  closed=False))},
        optional=("metadata", "output_expires_after"), closed=False),
    "NewFile": {
        **_object({"file": {"type": "string", "format": "binary", "description": "The JSONL file of requests"},
                   "purpose": {"enum": list(PURPOSES)},
                   EXPIRES_ANCHOR: {"const": "created_at"}, EXPIRES_SECONDS: TTL},
                  optional=(EXPIRES_ANCHOR, EXPIRES_SECONDS), closed=False),
        "dependentRequired": {EXPIRES_ANCHOR: [EXPIRES_SECONDS], EXPIRES_SECONDS: [EXPIRES_ANCHOR]},
        "description": f"At most {MAX_PARTS} form parts, each field but the file at most {MAX_FIELD_BYTES} bytes"},
}


def _json(schema: Schema) -> Schema:
    return {"content": {"application/json": {"schema": schema}}}


def _operation(operation_id: str, summary: str, answer: Schema, errors: tuple[int, ...], *,
               parameters: tuple[Schema, ...] = (), body: Schema | None = None, links: Schema | None = None) -> Schema:
    """An operation; ``links``: the operations that take the id it answers (OpenAPI links, for a
    client or a stateful fuzzer to follow)."""
    ok: Schema = {"description": "OK", **answer}
    if links:
        ok["links"] = links
    operation: Schema = {
        "operationId": operation_id, "summary": summary, "parameters": list(parameters),
        "responses": {"200": ok, **{str(status): {"$ref": f"#/components/responses/{status}"}
                                    for status in sorted({*errors, *COMMON_ERRORS})}}}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": body}
    return operation


def _in_path(name: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _paging(max_limit: int) -> tuple[Schema, ...]:
    return (_query("limit", {"type": "integer", "minimum": 1, "maximum": max_limit}),
            _query("after", {"type": "string"}), _query("order", {"enum": ["asc", "desc"]}))


IDEMPOTENCY_KEY: Schema = {"name": "Idempotency-Key", "in": "header", "required": False,
                           "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY,
                                      "pattern": "^[ -~]+$"}}



def _links_by_id(parameter: str, *operation_ids: str) -> Schema:
    return {operation_id: {"operationId": operation_id, "parameters": {parameter: "$response.body#/id"}}
            for operation_id in operation_ids}


FILE_LINKS = {**_links_by_id("file_id", "retrieveFile", "downloadFile", "deleteFile"),
              "createBatch": {"operationId": "createBatch", "requestBody": {"input_file_id": "$response.body#/id"}}}
BATCH_LINKS = _links_by_id("batch_id", "retrieveBatch", "cancelBatch", "deleteBatch")
FILE_ID, BATCH_ID = _in_path("file_id"), _in_path("batch_id")

PATHS: dict[str, Schema] = {
    "/v1/files": {
        "post": _operation("createFile", "Upload a file", _json(_ref("File")), (400, 413, 429),
                           body={"multipart/form-data": {"schema": _ref("NewFile")}}, links=FILE_LINKS),
        "get": _operation("listFiles", "List the key's files", _json(_ref("FileList")), (400, 404),
                          parameters=(_query("purpose", {"type": "string"}), *_paging(10_000))),
    },
    "/v1/files/{file_id}": {
        "get": _operation("retrieveFile", "A file", _json(_ref("File")), (404,), parameters=(FILE_ID,)),
        "delete": _operation("deleteFile", "Delete a file", _json(_ref("FileDeleted")), (404,),
                             parameters=(FILE_ID,)),
    },
    "/v1/files/{file_id}/content": {
        "get": _operation("downloadFile", "A file's content", {"content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}}, (404,), parameters=(FILE_ID,)),
    },
    "/v1/batches": {
        "post": _operation("createBatch", "Create a batch", _json(_ref("Batch")), (400, 404, 409, 413, 429),
                           parameters=(IDEMPOTENCY_KEY,), body=_json(_ref("NewBatch"))["content"],
                           links=BATCH_LINKS),
        "get": _operation("listBatches", "List the key's batches", _json(_ref("BatchList")), (400, 404),
                          parameters=_paging(100)),
    },
    "/v1/batches/{batch_id}": {
        "get": _operation("retrieveBatch", "A batch", _json(_ref("Batch")), (404,), parameters=(BATCH_ID,)),
        "delete": _operation("deleteBatch", "Delete an ended batch with its output and error files",
                             _json(_ref("BatchDeleted")), (400, 404), parameters=(BATCH_ID,)),
    },
    "/v1/batches/{batch_id}/cancel": {
        "post": _operation("cancelBatch", "Cancel a batch", _json(_ref("Batch")), (400, 404),
                           parameters=(BATCH_ID,)),
    },
}

OPENAPI: Schema = {
    "openapi": "3.1.0",
    "info": {"title": "aivvm-batch serve", "version": "1",
             "description": "OpenAI's Files and Batches API over a Redis queue and Celery workers."},
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "responses": {str(status): {"description": text, **_json(_ref("Error"))} for status, text in ERRORS.items()},
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
    "security": [{"bearer": []}],
}
