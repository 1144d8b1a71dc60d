"""serve's OpenAPI schema (serve/openapi.py): valid OpenAPI 3.1, and every /v1 route in it as the app has it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import schemathesis
from starlette.routing import Route

from aivvm_batch.serve.app import ROUTES
from aivvm_batch.serve.openapi import OPENAPI


def test_the_schema_is_valid_openapi_3_1() -> None:
    schema = schemathesis.openapi.from_dict(OPENAPI)
    schema.validate()  # against the OpenAPI 3.1 meta-schema; raises where it does not hold
    assert OPENAPI["openapi"] == "3.1.0"
    operation_ids = [op["operationId"] for methods in OPENAPI["paths"].values() for op in methods.values()]
    assert len(operation_ids) == len(set(operation_ids)) == 10


def test_the_schema_describes_every_api_route_and_method() -> None:
    served = {(route.path, method.lower()) for route in ROUTES if isinstance(route, Route)
              and route.path.startswith("/v1/") for method in route.methods or () if method != "HEAD"}
    described = {(path, method) for path, methods in OPENAPI["paths"].items() for method in methods}
    assert described == served


def test_every_link_names_an_operation_and_every_reference_resolves() -> None:
    operation_ids = {op["operationId"] for methods in OPENAPI["paths"].values() for op in methods.values()}
    links = [link for methods in OPENAPI["paths"].values() for op in methods.values()
             for link in op["responses"]["200"].get("links", {}).values()]
    assert links and {link["operationId"] for link in links} <= operation_ids
    references = list(_references(OPENAPI))
    assert references
    for reference in references:
        components, kind, name = reference.removeprefix("#/").split("/")
        assert name in OPENAPI[components][kind], reference


def _references(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref":
                yield item
            else:
                yield from _references(item)
    elif isinstance(value, list):
        for item in value:
            yield from _references(item)
