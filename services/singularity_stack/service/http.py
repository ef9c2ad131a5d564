"""JSON helpers for the services' HTTP APIs: one way to answer, one way to refuse."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from singularity_stack.contract import describe_validation_error

M = TypeVar("M", bound=BaseModel)


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot encode {type(value).__name__}")


def json_response(data: Any, status_code: int = 200) -> Response:
    return Response(json.dumps(data, default=_encode), status_code=status_code, media_type="application/json")


def error_response(status_code: int, reason: str) -> Response:
    return json_response({"error": reason}, status_code)


class BadRequest(Exception):
    def __init__(self, reason: str, status_code: int = 422) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_code = status_code

    def response(self) -> Response:
        return error_response(self.status_code, self.reason)


async def parse_body(request: Request, model: type[M]) -> M:
    """The request's JSON body as `model`, or BadRequest naming what is wrong."""
    try:
        data = await request.json()
    except ValueError:
        raise BadRequest("the body is not valid JSON", 400) from None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise BadRequest(describe_validation_error(error)) from None


def path_uuid(request: Request, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params[name])
    except ValueError:
        raise BadRequest(f"{name} must be a UUID", 404) from None
