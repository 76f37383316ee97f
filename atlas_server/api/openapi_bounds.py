"""Put back the bounds that Litestar leaves out of the OpenAPI schema.

Why: Litestar 2 copies a field's `Meta(ge=..., gt=...)` into the schema only when the value
is truthy, so `max_tokens >= 0`, `temperature >= 0` and `top_p > 0` reached clients and
fuzzers (schemathesis) as unbounded, though msgspec enforces them on every request; and it
drops the bounds inside unions and containers (`stop`'s string lengths and item count,
`logit_bias`'s key pattern and value range, `prompt`'s minimum length).
What it does: `restore_zero_bounds(app, structs)` asks msgspec for the JSON schema of the
request Structs (msgspec writes every bound) and walks each property of the app's schema
components of the same names beside msgspec's: every numeric, length, item-count and
pattern keyword msgspec has and Litestar lacks is added, in union members (matched by
type), array items, and a mapping's keys and values. Litestar puts bounds beside a `oneOf`
for optional fields; they apply to the non-null member, as JSON Schema defines for
keywords that do not match the instance's type.
What it does not do: change validation (msgspec does that) or touch any other keyword.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec
from litestar import Litestar
from litestar.openapi.spec import OpenAPIType, Reference, Schema

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
    "pattern": "pattern",
}


def _type_name(schema: Schema) -> str | None:
    kind = schema.type
    return kind.value if isinstance(kind, OpenAPIType) else None


def _restore(target: Schema | Reference, truth: dict[str, Any]) -> None:
    """Add to `target` (Litestar's) the bounds of `truth` (msgspec's), recursively."""
    if not isinstance(target, Schema):  # a $ref: its own component gets its own pass
        return
    for key, attr in BOUNDS.items():
        if key in truth and getattr(target, attr) is None:
            setattr(target, attr, truth[key])
    truths = [m for m in truth.get("anyOf", []) if m.get("type") != "null"]
    served = [
        m for m in (target.one_of or target.any_of or [])
        if isinstance(m, Schema) and _type_name(m) != "null"
    ]  # fmt: skip
    if len(truths) == 1 and len(served) <= 1:
        # Optional: Litestar puts bounds beside the oneOf and some in its member; both get all.
        _restore(target, truths[0])
        if served:
            _restore(served[0], truths[0])
    else:
        for member in served:
            same = [m for m in truths if m.get("type") == _type_name(member)]
            if len(same) == 1:
                _restore(member, same[0])
    if isinstance(truth.get("items"), dict) and target.items is not None:
        _restore(target.items, truth["items"])
    values = truth.get("additionalProperties")
    if isinstance(values, dict) and isinstance(target.additional_properties, Schema):
        _restore(target.additional_properties, values)
    keys = truth.get("propertyNames")
    if isinstance(keys, dict) and target.property_names is None and "pattern" in keys:
        target.property_names = Schema(type=OpenAPIType.STRING, pattern=keys["pattern"])


def restore_zero_bounds(app: Litestar, structs: Iterable[type[msgspec.Struct]]) -> None:
    _, truth = msgspec.json.schema_components(tuple(structs))
    components = app.openapi_schema.components.schemas or {}
    for name, struct_schema in truth.items():
        served = components.get(name)
        if served is None or not served.properties:
            continue
        for field, prop in struct_schema.get("properties", {}).items():
            target = served.properties.get(field)
            if target is not None:
                _restore(target, prop)
