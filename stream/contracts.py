"""The topic contracts (SPEC section 10) as JSON Schemas (draft 2020-12), generated from the code
that validates and builds the messages, never written by hand:

- `interactions`: from the validator's field table (`stream.validate.INPUT_FIELDS`)
- `recommendations`: from the output builder's field table (`models.serving.MESSAGE_FIELDS`)
- `interactions.dlq`: from the DLQ header table (`stream.dlq.ERROR_HEADERS`); the schema is of a
  DLQ record in its JSON form (`livemb dlq tail --jsonl`), the Kafka value being the original bytes

`livemb schemas --out docs/schemas` writes them; tests/test_contracts.py checks the shipped files
equal what this module generates. A schema's version is in its `$id`; bump it (and the header
below) on any change a consumer must notice.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from livemb.models.serving import MESSAGE_FIELDS, MESSAGE_REQUIRED
from livemb.stream.dlq import DLQ_SCHEMA_VERSION, entry_schema
from livemb.stream.ports import Headers
from livemb.stream.validate import INPUT_FIELDS, MAX_TS_MS

DRAFT = "https://json-schema.org/draft/2020-12/schema"
INTERACTIONS_VERSION = 1
RECOMMENDATIONS_VERSION = 1
CONTENT_TYPE = "application/json"
# The headers of every `recommendations` record (the DLQ keeps the input's own; stream/dlq.py).
OUTPUT_HEADERS: Headers = (("schema_version", str(RECOMMENDATIONS_VERSION).encode()),
                           ("content-type", CONTENT_TYPE.encode()))


def _input_property(kind: str, required: bool, max_chars: int | None) -> dict[str, object]:
    if kind == "ident":
        text: dict[str, object] = {"minLength": 1, "pattern": r"\S"}
        if max_chars is not None:
            text["maxLength"] = max_chars
        return {"type": ["string", "integer"], **text}
    if kind == "ts":
        return {"type": ["integer", "string"], "minimum": 0, "maximum": MAX_TS_MS, "minLength": 1}
    if kind == "text":
        return {"type": ["string"] if required else ["string", "null"], "minLength": 1}
    raise ValueError(kind)


def interactions_schema() -> dict[str, object]:
    props = {}
    for f in INPUT_FIELDS:
        p = {**_input_property(f.kind, f.required, f.max_chars), "description": f.doc}
        if f.default is not None:
            p["default"] = f.default
        props[f.name] = p
    return {
        "$schema": DRAFT,
        "$id": f"urn:livemb:schema:interactions:{INTERACTIONS_VERSION}",
        "title": "interactions: one input event",
        "description": "The value of one `interactions` record (key = user_id), UTF-8 JSON, optionally in the "
                       "Confluent schema-registry wire format (byte 0x00 + 4-byte big-endian schema id + this JSON; "
                       "the id is not looked up). Other fields are ignored. Rules not expressible here: the value "
                       "is at most max_payload_bytes (64 KiB) and ts at most max_future_s ahead; anything refused "
                       "goes to the DLQ with its reason.",
        "type": "object",
        "required": [f.name for f in INPUT_FIELDS if f.required],
        "properties": props,
        "additionalProperties": True,
    }


def recommendations_schema() -> dict[str, object]:
    return {
        "$schema": DRAFT,
        "$id": f"urn:livemb:schema:recommendations:{RECOMMENDATIONS_VERSION}",
        "title": "recommendations: one user's latest embedding and top-K",
        "description": "The value of one `recommendations` record (key = user_id), UTF-8 JSON; headers "
                       f"`schema_version: {RECOMMENDATIONS_VERSION}` and `content-type: {CONTENT_TYPE}`. `dim` "
                       "declares the length of `embedding` and `next_session_embedding`: it changes only with the "
                       "model (so does `model`).",
        "type": "object",
        "required": list(MESSAGE_REQUIRED),
        "properties": MESSAGE_FIELDS,
        "additionalProperties": False,
    }


def dlq_schema() -> dict[str, object]:
    return {
        "$schema": DRAFT,
        "$id": f"urn:livemb:schema:interactions.dlq:{DLQ_SCHEMA_VERSION}",
        "title": "interactions.dlq: one dead-lettered input record, as `livemb dlq tail --jsonl` prints it",
        "description": "The Kafka record keeps the refused record's key, value bytes and headers and adds the "
                       "error as headers (Kafka Connect's names, plus livemb-dlq-timestamp and "
                       "livemb-dlq-schema-version); `error` is those headers decoded. `livemb dlq redrive "
                       "--from-file` reads this form back (edit key, value or headers to fix a record).",
        **entry_schema(),
    }


SCHEMAS = {
    "interactions.schema.json": interactions_schema,
    "recommendations.schema.json": recommendations_schema,
    "dlq.schema.json": dlq_schema,
}


def render(schema: dict[str, object]) -> bytes:
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2) + b"\n"


def write_schemas(out: Path) -> list[Path]:
    """Write every schema file into `out` (created); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in SCHEMAS.items():
        (path := out / name).write_bytes(render(make()))
        paths.append(path)
    return paths


def stale_schemas(out: Path) -> list[str]:
    """The schema files in `out` that differ from the generated ones (or are missing)."""
    return [name for name, make in SCHEMAS.items()
            if not (out / name).is_file() or (out / name).read_bytes() != render(make())]
