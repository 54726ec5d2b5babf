"""The dead-letter record of `interactions.dlq` (SPEC section 10), in Kafka Connect's style.

A DLQ record is the refused input record itself: its original key, its original value bytes and
its original headers, with the error added as headers (`ERROR_HEADERS`): the source topic,
partition and offset, the `DlqReason` as the exception class name, a readable message, the time
it was dead-lettered and the version of this header contract. Re-driving a record (`livemb dlq
redrive`) is therefore re-producing key, value and the original headers (`redrive_headers`).

A value longer than `MAX_DLQ_VALUE_BYTES` (only an `oversized` record can be) is cut there so
that the DLQ record itself stays under the broker's message size limit; the header
`livemb-dlq-value-truncated` then holds the original size, and such a record is never re-driven.

`DlqEntry` is one DLQ record read back, and `DlqEntry.to_json` its JSON form: one line of
`livemb dlq tail --jsonl`, the input of `livemb dlq redrive --from-file`, and what
docs/schemas/dlq.schema.json describes (`entry_schema`, generated from the tables below).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from livemb.core.outcomes import DlqReason
from livemb.stream.ports import Headers, OutputRecord
from livemb.stream.validate import Invalid

DLQ_SCHEMA_VERSION = 1
MAX_DLQ_VALUE_BYTES = 256 * 1024

# error field -> (header name, type, description); the field names are those of DlqEntry.to_json()["error"]
ERROR_HEADERS: dict[str, tuple[str, str, str]] = {
    "topic": ("__connect.errors.topic", "string", "topic of the refused record"),
    "partition": ("__connect.errors.partition", "integer", "its partition"),
    "offset": ("__connect.errors.offset", "integer", "its offset"),
    "reason": ("__connect.errors.exception.class.name", "reason", "why it was refused: a DlqReason value"),
    "message": ("__connect.errors.exception.message", "string", "the reason in words"),
    "timestamp": ("livemb-dlq-timestamp", "integer", "when it was dead-lettered, epoch ms"),
    "schema_version": ("livemb-dlq-schema-version", "integer", "version of this header contract"),
}
REASON_HEADER = ERROR_HEADERS["reason"][0]
VALUE_TRUNCATED = "livemb-dlq-value-truncated"  # original value size, when the value was cut
REDRIVEN_FROM = "livemb-redriven-from"  # on a re-driven input record: "<dlq topic>/<partition>/<offset>"
ADDED_HEADERS = frozenset({h for h, _, _ in ERROR_HEADERS.values()} | {VALUE_TRUNCATED})

_FIELD_WORDS = {"missing_field": "field {} is missing", "bad_type": "field {} has the wrong type",
                "empty_field": "field {} is empty", "bad_value": "field {} has an unreadable value"}
_MESSAGES = {
    DlqReason.OVERSIZED: "the value is larger than max_payload_bytes",
    DlqReason.NOT_JSON: "the value is not JSON (nor Confluent-framed JSON)",
    DlqReason.NOT_OBJECT: "the value is JSON but not an object",
    DlqReason.UNPARSEABLE: "the validator failed on the value (e.g. pathological nesting)",
    DlqReason.USER_ID_TOO_LONG: "user_id is longer than 128 characters",
    DlqReason.FUTURE_TS: "ts is further in the future than max_future_s",
    DlqReason.KEY_MISMATCH: "the Kafka key is not the user_id",
    DlqReason.TOO_LATE: "ts is older than the user's last event by more than max_lateness_s",
    DlqReason.STATE_UNREADABLE: "the user's stored state cannot be read by this worker",
    DlqReason.PROCESSING_ERROR: "the model step failed on the batch",
}


def reason_message(reason: DlqReason) -> str:
    if reason in _MESSAGES:
        return _MESSAGES[reason]
    problem, _, name = reason.partition(":")
    return _FIELD_WORDS[problem].format(name)


def dead_letter(inv: Invalid, dlq_topic: str, now_ms: int) -> OutputRecord:
    """The DLQ record of a refused input record."""
    value = inv.raw[:MAX_DLQ_VALUE_BYTES]
    fields = {"topic": inv.topic, "partition": inv.partition, "offset": inv.offset, "reason": inv.reason,
              "message": reason_message(inv.reason), "timestamp": now_ms, "schema_version": DLQ_SCHEMA_VERSION}
    added = [(ERROR_HEADERS[k][0], str(v).encode()) for k, v in fields.items()]
    if len(inv.raw) > MAX_DLQ_VALUE_BYTES:
        added.append((VALUE_TRUNCATED, str(len(inv.raw)).encode()))
    return OutputRecord(dlq_topic, inv.key, value, (*inv.headers, *added))


def redrive_headers(headers: Headers, source: str) -> Headers:
    """The original headers of a DLQ record (the error headers removed) + `livemb-redriven-from`."""
    return (*((k, v) for k, v in headers if k not in ADDED_HEADERS and k != REDRIVEN_FROM),
            (REDRIVEN_FROM, source.encode()))


# ------------------------------------------------------------------ reading DLQ records back


def header(headers: Headers | list, name: str) -> str | None:
    """The last value of header `name` as text (None when absent)."""
    found = [v for k, v in headers if k == name]
    return found[-1].decode("utf-8", "replace") if found else None


def _text_or_b64(b: bytes | None) -> str | dict[str, str] | None:
    if b is None:
        return None
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(b).decode("ascii")}


def _bytes_of(v: object) -> bytes | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, dict) and isinstance(v.get("base64"), str):
        return base64.b64decode(v["base64"], validate=True)
    raise ValueError(f"expected a string, null or {{'base64': ...}}, got {v!r}")


@dataclass(frozen=True)
class DlqEntry:
    """One DLQ record read back: where it sits in the DLQ, and the record itself."""

    dlq_topic: str
    dlq_partition: int
    dlq_offset: int
    key: bytes | None
    value: bytes
    headers: Headers

    def header(self, name: str) -> str | None:
        return header(self.headers, name)

    def error(self) -> dict[str, object]:
        """The error fields from the headers (None where a header is missing or unreadable)."""
        out: dict[str, object] = {}
        for name, (header, kind, _) in ERROR_HEADERS.items():
            v = self.header(header)
            if kind == "integer" and v is not None:
                out[name] = int(v) if v.lstrip("-").isdigit() else None
            else:
                out[name] = v
        return out

    @property
    def reason(self) -> str | None:
        return self.header(REASON_HEADER)

    @property
    def truncated(self) -> bool:
        return self.header(VALUE_TRUNCATED) is not None

    @property
    def source(self) -> str:
        return f"{self.dlq_topic}/{self.dlq_partition}/{self.dlq_offset}"

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "dlq": {"topic": self.dlq_topic, "partition": self.dlq_partition, "offset": self.dlq_offset},
            "error": self.error(),
            "key": _text_or_b64(self.key),
            "value": _text_or_b64(self.value),
            "headers": [[k, _text_or_b64(v)] for k, v in self.headers],
        }
        if self.truncated:
            doc["value_truncated"] = int(self.header(VALUE_TRUNCATED) or 0)
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> DlqEntry:
        """A line of `dlq tail --jsonl`, possibly edited (key, value, headers); raises ValueError."""
        try:
            dlq = doc["dlq"]
            value = _bytes_of(doc["value"])
            if value is None:
                raise ValueError("value is null")
            headers = tuple((str(k), _bytes_of(v) or b"") for k, v in doc.get("headers", []))
            return cls(str(dlq["topic"]), int(dlq["partition"]), int(dlq["offset"]), _bytes_of(doc.get("key")),
                       value, headers)
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a DLQ entry ({type(e).__name__}: {e})") from None


def entry_schema() -> dict[str, object]:
    """JSON Schema (properties part) of `DlqEntry.to_json()`, from ERROR_HEADERS."""
    data = {"oneOf": [{"type": "string", "description": "UTF-8 text"},
                      {"type": "object", "properties": {"base64": {"type": "string"}}, "required": ["base64"],
                       "additionalProperties": False, "description": "bytes that are not UTF-8"}]}
    kinds = {"string": {"type": ["string", "null"]}, "integer": {"type": ["integer", "null"]},
             "reason": {"enum": [*(r.value for r in DlqReason), None]}}
    error = {name: {**kinds[kind], "description": f"header `{header}`: {doc}"}
             for name, (header, kind, doc) in ERROR_HEADERS.items()}
    coord = {"type": "object", "required": ["topic", "partition", "offset"],
             "properties": {"topic": {"type": "string"}, "partition": {"type": "integer", "minimum": 0},
                            "offset": {"type": "integer", "minimum": 0}}}
    return {
        "$defs": {"data": data},
        "type": "object",
        "required": ["dlq", "error", "key", "value", "headers"],
        "properties": {
            "dlq": {**coord, "description": "where this record sits in the DLQ (the id `redrive` reports)"},
            "error": {"type": "object", "required": list(ERROR_HEADERS), "properties": error,
                      "description": "the error headers, decoded (null: header missing)"},
            "key": {"oneOf": [{"type": "null"}, {"$ref": "#/$defs/data"}], "description": "the original key"},
            "value": {"$ref": "#/$defs/data", "description": "the original value"},
            "headers": {"type": "array", "description": "every header in order: the original ones, then the "
                        "error headers", "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                                   "prefixItems": [{"type": "string"}, {"$ref": "#/$defs/data"}]}},
            "value_truncated": {"type": "integer", "description": f"header `{VALUE_TRUNCATED}`: the original "
                                f"size; the value holds its first {MAX_DLQ_VALUE_BYTES} bytes"},
        },
    }
