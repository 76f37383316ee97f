"""Put back the zero bounds that Litestar leaves out of the OpenAPI schema.

Why: Litestar 2 copies a field's `Meta(ge=..., gt=...)` into the schema only when the value
is truthy, so `max_tokens >= 0`, `temperature >= 0` and `top_p > 0` reached clients and
fuzzers (schemathesis) as unbounded, though msgspec enforces them on every request.
What it does: `restore_zero_bounds(app, structs)` asks msgspec for the JSON schema of the
request Structs (msgspec writes every bound) and, for each property of the app's schema
components of the same names, adds any numeric or length bound that msgspec has and the
Litestar schema lacks. Litestar puts bounds beside a `oneOf` for optional fields; they
apply to the non-null member, as JSON Schema defines for keywords that do not match the
instance's type.
What it does not do: change validation (msgspec does that) or touch any other keyword.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec
from litestar import Litestar

# JSON Schema keyword -> attribute of Litestar's Schema object.
BOUNDS = {
    "minimum": "minimum",
    "maximum": "maximum",
    "exclusiveMinimum": "exclusive_minimum",
    "exclusiveMaximum": "exclusive_maximum",
    "minLength": "min_length",
    "maxLength": "max_length",
    "minItems": "min_items",
    "maxItems": "max_items",
}


def _bounds(prop: dict[str, Any]) -> dict[str, Any]:
    """The bounds of a property, or of its one non-null member when it is optional."""
    found = {key: prop[key] for key in BOUNDS if key in prop}
    members = [m for m in prop.get("anyOf", []) if m.get("type") != "null"]
    if len(members) == 1:
        found.update({key: members[0][key] for key in BOUNDS if key in members[0]})
    return found


def restore_zero_bounds(app: Litestar, structs: Iterable[type[msgspec.Struct]]) -> None:
    _, truth = msgspec.json.schema_components(tuple(structs))
    components = app.openapi_schema.components.schemas or {}
    for name, struct_schema in truth.items():
        served = components.get(name)
        if served is None or not served.properties:
            continue
        for field, prop in struct_schema.get("properties", {}).items():
            target = served.properties.get(field)
            if target is None or not hasattr(target, "minimum"):  # a $ref: its own component
                continue
            for key, value in _bounds(prop).items():
                if getattr(target, BOUNDS[key]) is None:
                    setattr(target, BOUNDS[key], value)
