"""Request bodies declared once: the machinery. The bodies are declared beside their
parsers: ``/run``'s and the native routes' in :mod:`.requests`, the compatible routes'
in :mod:`.openai_api` and :mod:`.anthropic_api` (their shared fields in :mod:`.compat`).

A body is a pydantic model (:func:`body_model`): its fields' types, bounds and
patterns validate the body (:func:`validate`) *and* are the JSON Schema the
OpenAPI document shows (:func:`component_schemas`). Each field also carries a
:class:`Says`: how its refusals read, so that a 400 names the field in this
service's own words rather than pydantic's. A check JSON Schema cannot state (an
image's first bytes, a size in UTF-8 bytes, the operator's ceiling) is a
validator on the field (:func:`checked`) that raises :class:`BadRequest`.

Why pydantic: it is already installed (claude-agent-sdk → mcp → pydantic), it
generates JSON Schema 2020-12 (what OpenAPI 3.1 uses) from the same declaration
that validates, and its errors are data (type, location, context) that translate
into our messages; attrs + cattrs would need every schema written by hand again.

Error handling: :func:`validate` raises :class:`BadRequest` (400, or the status a
validator gave, e.g. 413 for a size) naming the first field at fault, in
declaration order. pydantic's Rust strings cannot hold a lone surrogate (JSON lets
one be written): a field that must accept one states its bounds for the schema
only (:func:`documented`) and checks them in a validator.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    WithJsonSchema,
    create_model,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, models_json_schema
from pydantic_core import PydanticCustomError, core_schema

Schema = dict[str, Any]

# Strict: a string is not a number, a number not a string, true not 1. Extra fields are
# ignored (clients send more than we read); a JSON number with no fraction is an integer
# (integral, below), as JSON Schema counts it.
STRICT = ConfigDict(strict=True, extra="ignore")


class BadRequest(Exception):
    """A client error: answered as ``{"error": message}`` with ``status``.

    ``param``: the parameter at fault, for the compatible routes' error shapes."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


@attrs.frozen(eq=False)
class Says:
    """How a field's refusals read after ``"<field>: "``.

    ``wrong`` for any error not named in ``when`` (keyed by pydantic's error type,
    e.g. ``string_too_long``); ``required`` when the field is missing or null (None:
    as ``wrong``). Templates may use ``{got}`` (the JSON type given) and the error's
    context (``{le}``, ``{max_length}``, ``{actual_length}``...). ``per_item``: an error
    about one item of a list names it (``images[0]: ``) rather than the field.
    """

    wrong: str
    required: str | None = None
    when: Mapping[str, str] = attrs.field(factory=dict)
    per_item: bool = False

    def text(self, error: Mapping[str, Any]) -> str:
        given = error.get("input")
        if self.required is not None and (error["type"] == "missing" or given is None):
            template = self.required
        else:
            template = self.when.get(error["type"], self.wrong)
        return template.format(got=json_type(given), **error.get("ctx", {}))


def documented(**schema: Any) -> WithJsonSchema:
    """A bound stated for the schema only: a validator on the same field checks it."""
    return WithJsonSchema(schema)


def json_type(value: Any) -> str:
    """The JSON name of ``value``'s type, as a refusal says what it got."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def integral(value: Any) -> Any:
    """``value``, with a JSON number that has no fraction (``1000.0``, ``1e3``) as an int.

    JSON has numbers, not integers: JSON Schema (and so the OpenAPI document) counts
    1000.0 as the integer 1000, and so do the parsers.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integral = BeforeValidator(integral)


# --- validating ------------------------------------------------------------------------


def validate(model: type[BaseModel], obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` (a decoded JSON object) validated as ``model``: its fields' values by name.
    :class:`BadRequest` naming the first field at fault."""
    try:
        return dict(model.model_validate(obj).__dict__)
    except ValidationError as exc:
        raise _first_problem(model, exc) from None


def _first_problem(model: type[BaseModel], exc: ValidationError) -> BadRequest:
    error = exc.errors(include_url=False)[0]
    loc = error["loc"]
    if error["type"] == "checked":  # a validator's own words (images[0]: ...)
        ctx = error["ctx"]
        return BadRequest(ctx["message"], ctx["status"], param=ctx["param"] or str(loc[0]))
    says = _says(model, str(loc[0]))
    field = _path(loc) if says.per_item else str(loc[0])
    return BadRequest(f"{field}: {says.text(error)}", param=str(loc[0]))


def _path(loc: tuple[int | str, ...]) -> str:
    """Where an error is, as a message names it: ``images[0]``."""
    return str(loc[0]) + "".join(f"[{part}]" for part in loc[1:] if isinstance(part, int))


def _says(model: type[BaseModel], field: str) -> Says:
    info = model.model_fields.get(field)
    for item in info.metadata if info else ():
        if isinstance(item, Says):
            return item
    return Says("not valid")  # (every body in requests.py gives each field its Says)


# --- the schema ----------------------------------------------------------------------------


class _Components(GenerateJsonSchema):
    """JSON Schema as the OpenAPI document writes it: no generated titles, no ``default:
    null`` (null already reads as "not given")."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        value = super().model_schema(schema)
        value.pop("title", None)
        return value

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        value = super().default_schema(schema)
        if value.get("default", ...) is None:
            del value["default"]
        return value


def component_schemas(*models: type[BaseModel]) -> dict[str, Schema]:
    """``models`` (and the models they use) as ``#/components/schemas`` entries: a copy
    (the caller may change it) of what is generated once (~30 ms for the bodies)."""
    return copy.deepcopy(_generated(models))


@functools.cache
def _generated(models: tuple[type[BaseModel], ...]) -> dict[str, Schema]:
    _, top = models_json_schema(
        [(model, "validation") for model in models],
        ref_template="#/components/schemas/{model}",
        schema_generator=_Components,
    )
    defs: dict[str, Schema] = top.get("$defs", {})
    return defs


def body_model(
    name: str, description: str, *, required: tuple[str, ...] = (), **fields: Any
) -> type[BaseModel]:
    """A body: ``fields`` as ``name=(annotation, default)`` (``...``: required).

    ``required``: fields the schema says are required though the model takes them as
    None when absent (a validator of the field that uses the model says why instead)."""
    extra: dict[str, Any] = {"description": description}
    if required:
        extra["required"] = list(required)
    config = ConfigDict(**STRICT, json_schema_extra=extra)
    model: type[BaseModel] = create_model(name, __config__=config, **fields)
    return model


def checked(check: Callable[[Any], Any]) -> AfterValidator:
    """A validator that refuses by raising :class:`BadRequest`: its message must start with
    ``"<field>: "`` (the item's path, as ``images[0]: ``), as :func:`validate` keeps it."""

    def run(value: Any) -> Any:
        try:
            return check(value)
        except BadRequest as exc:
            said = {"message": exc.message, "status": exc.status, "param": exc.param}
            raise PydanticCustomError("checked", "{message}", said) from None

    return AfterValidator(run)
