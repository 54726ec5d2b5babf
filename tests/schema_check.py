"""A JSON Schema (draft 2020-12) validator for the subset docs/schemas/ uses, so the contract tests
need no new dependency. A keyword outside the subset raises, so a schema that grows one cannot be
checked half-way without notice (tests/test_contracts.py also shows each keyword can fail)."""

from __future__ import annotations

import re
from typing import Any

ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description", "default"}
SUPPORTED = {"$ref", "type", "enum", "const", "properties", "required", "additionalProperties", "items",
             "prefixItems", "minItems", "maxItems", "minLength", "maxLength", "pattern", "minimum", "maximum",
             "oneOf"}
TYPES = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def errors(instance: Any, schema: dict, root: dict | None = None, path: str = "$") -> list[str]:
    """Every violation of `schema` by `instance`, as 'path: what' strings ([] = valid)."""
    root = root if root is not None else schema
    unknown = set(schema) - ANNOTATIONS - SUPPORTED
    if unknown:
        raise ValueError(f"keywords outside the checked subset: {sorted(unknown)}")
    out: list[str] = []
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/"), ref
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        out += errors(instance, target, root, path)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(TYPES[t](instance) for t in types):
            return [*out, f"{path}: {type(instance).__name__} is not {types}"]
    if "enum" in schema and not any(instance == e and type(instance) is type(e) for e in schema["enum"]):
        out.append(f"{path}: {instance!r} not in enum")
    if "const" in schema and not (instance == schema["const"] and type(instance) is type(schema["const"])):
        out.append(f"{path}: {instance!r} != const {schema['const']!r}")
    if "oneOf" in schema:
        n = sum(not errors(instance, s, root, path) for s in schema["oneOf"])
        if n != 1:
            out.append(f"{path}: matches {n} of oneOf, not exactly 1")
    if isinstance(instance, str):
        if len(instance) < schema.get("minLength", 0):
            out.append(f"{path}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(instance) > schema["maxLength"]:
            out.append(f"{path}: longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            out.append(f"{path}: does not match {schema['pattern']!r}")
    if TYPES["number"](instance):
        if "minimum" in schema and instance < schema["minimum"]:
            out.append(f"{path}: below {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            out.append(f"{path}: above {schema['maximum']}")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            out.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(instance) > schema["maxItems"]:
            out.append(f"{path}: more than {schema['maxItems']} items")
        prefix = schema.get("prefixItems", [])
        for i, (v, s) in enumerate(zip(instance, prefix, strict=False)):
            out += errors(v, s, root, f"{path}[{i}]")
        if "items" in schema:
            for i, v in enumerate(instance[len(prefix):], start=len(prefix)):
                out += errors(v, schema["items"], root, f"{path}[{i}]")
    if isinstance(instance, dict):
        out += [f"{path}: {k!r} is required" for k in schema.get("required", []) if k not in instance]
        props = schema.get("properties", {})
        for k, v in instance.items():
            if k in props:
                out += errors(v, props[k], root, f"{path}.{k}")
            elif schema.get("additionalProperties", True) is False:
                out.append(f"{path}: {k!r} is not allowed")
    return out
