"""The topic contracts (SPEC section 10) without a broker: the shipped docs/schemas/ files are the
generated ones, the interactions schema agrees with the validator, built messages and DLQ records
validate, and the checker can fail on each keyword it is trusted with. The same schemas are
checked against records consumed from a live worker in tests/test_dlq_redrive.py and
tests/test_live_model.py."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch

from livemb.core.items import ItemTable
from livemb.core.settings import Settings
from livemb.models.serving import MESSAGE_FIELDS, MESSAGE_REQUIRED, build_messages
from livemb.stream.contracts import SCHEMAS, dlq_schema, interactions_schema, recommendations_schema, stale_schemas
from livemb.stream.dlq import DlqEntry, dead_letter
from livemb.stream.validate import Invalid, validate
from livemb.tools.cli import main
from tests.conftest import ROOT
from tests.schema_check import errors

NOW = 1_700_000_000_000
S = Settings()


def test_shipped_schemas_are_the_generated_ones() -> None:
    assert stale_schemas(ROOT / "docs" / "schemas") == []


def test_schemas_command_writes_and_checks(tmp_path) -> None:
    assert main(["schemas", "--out", str(tmp_path), "--check"]) == 1  # nothing there yet
    assert main(["schemas", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SCHEMAS)
    assert main(["schemas", "--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "dlq.schema.json").write_text("{}")
    assert main(["schemas", "--out", str(tmp_path), "--check"]) == 1


# Documents on both sides of every rule the schema can express (the validator is the truth).
DOCS = [
    {"user_id": "u", "item_id": "i", "ts": NOW},
    {"user_id": 5, "item_id": 7, "ts": "2023-11-14T22:13:20Z", "event_type": "cart", "event_id": "e", "x": [1]},
    {"user_id": "u", "item_id": "i", "ts": NOW, "event_type": None, "event_id": None},
    {"user_id": "x" * 128, "item_id": "i", "ts": 0},
    {"user_id": "x" * 129, "item_id": "i", "ts": NOW},
    {"item_id": "i", "ts": NOW}, {"user_id": "u", "ts": NOW}, {"user_id": "u", "item_id": "i"},
    {"user_id": None, "item_id": "i", "ts": NOW}, {"user_id": "u", "item_id": "i", "ts": None},
    {"user_id": True, "item_id": "i", "ts": NOW}, {"user_id": "u", "item_id": 1.5, "ts": NOW},
    {"user_id": "u", "item_id": [], "ts": NOW}, {"user_id": "", "item_id": "i", "ts": NOW},
    {"user_id": "  ", "item_id": "i", "ts": NOW}, {"user_id": "u", "item_id": "", "ts": NOW},
    {"user_id": "u", "item_id": "i", "ts": -1}, {"user_id": "u", "item_id": "i", "ts": 2**63},
    {"user_id": "u", "item_id": "i", "ts": True}, {"user_id": "u", "item_id": "i", "ts": 1.5},
    {"user_id": "u", "item_id": "i", "ts": ""}, {"user_id": "u", "item_id": "i", "ts": NOW, "event_type": ""},
    {"user_id": "u", "item_id": "i", "ts": NOW, "event_type": 3}, {"user_id": "u", "item_id": "i", "ts": NOW,
                                                                    "event_id": ["e"]},
    [1, 2], "text", 3,
]


@pytest.mark.parametrize("doc", DOCS, ids=[orjson.dumps(d).decode()[:60] for d in DOCS])
def test_interactions_schema_agrees_with_the_validator(doc: object) -> None:
    accepted = not isinstance(validate(orjson.dumps(doc), "interactions", 0, 0, NOW, S), Invalid)
    assert (errors(doc, interactions_schema()) == []) == accepted


def test_schema_cannot_tell_an_iso_string_the_validator_refuses() -> None:
    """The one documented gap: an unreadable ISO-8601 string passes the schema (a string of length
    >= 1) and is refused by the validator as bad_value:ts."""
    doc = {"user_id": "u", "item_id": "i", "ts": "soon"}
    assert errors(doc, interactions_schema()) == []
    assert validate(orjson.dumps(doc), "interactions", 0, 0, NOW, S).reason == "bad_value:ts"


def messages(next_emb: bool, extra: dict | None = None) -> list[dict]:
    table = ItemTable(np.array(["a", "b", "c"]), np.eye(3, 4, dtype=np.float32))
    u = torch.ones(2, 4)
    items, scores = np.array([[1, 3, 0], [2, 0, 0]]), np.array([[0.5, 0.25, 0.0], [1.0, 0.0, 0.0]])
    return [orjson.loads(m) for _, m in build_messages(
        ["u1", "u2"], u, {"session": torch.tensor([1, 4])}, items, scores, table, np.array([NOW, NOW]),
        "hiertcn@abc", NOW + 5, u * 2 if next_emb else None, extra)]


def test_built_messages_validate_and_have_exactly_the_declared_fields() -> None:
    schema = recommendations_schema()
    for msg in [*messages(True), *messages(False), *messages(True, {"session_closed": True})]:
        assert errors(msg, schema) == []
        assert set(MESSAGE_REQUIRED) <= set(msg) <= set(MESSAGE_FIELDS)
        assert msg["dim"] == len(msg["embedding"]) == 4
    assert [len(m["candidates"]) for m in messages(True)] == [2, 1]


def test_recommendations_schema_refuses_broken_messages() -> None:
    good, schema = messages(True)[0], recommendations_schema()
    broken = [
        {k: v for k, v in good.items() if k != "dim"},
        {**good, "embedding": [1.0, None]},  # a NaN is serialised as null
        {**good, "embedding": []},
        {**good, "candidates": [{"item_id": "a"}]},
        {**good, "candidates": [{"item_id": 1, "score": 0.5}]},
        {**good, "model": "no-version"},
        {**good, "unexpected": 1},
        {**good, "session_closed": False},
        {**good, "next_session_embedding": "x"},
        {**good, "dim": 0},
    ]
    assert all(errors(b, schema) for b in broken)


def dlq_json(raw: bytes, key: bytes | None, headers=()) -> dict:
    inv = validate(raw, "interactions", 1, 7, NOW, S, key=key, headers=headers)
    assert isinstance(inv, Invalid)
    r = dead_letter(inv, "interactions.dlq", NOW)
    return orjson.loads(orjson.dumps(DlqEntry("interactions.dlq", 0, 3, r.key, r.value, r.headers).to_json()))


def test_dlq_entries_validate_and_broken_ones_do_not() -> None:
    schema = dlq_schema()
    entries = [dlq_json(b"{", b"u"), dlq_json(b"\xff\x00", None, (("h", b"\xfe"),)), dlq_json(b"x" * 70_000, b"k")]
    assert all(errors(e, schema) == [] for e in entries)
    e = entries[0]
    broken = [
        {k: v for k, v in e.items() if k != "headers"},
        {**e, "error": {**e["error"], "reason": "no_such_reason"}},
        {**e, "error": {k: v for k, v in e["error"].items() if k != "offset"}},
        {**e, "value": {"base64": "AA==", "extra": 1}},
        {**e, "value": None},
        {**e, "headers": [["only-a-name"]]},
        {**e, "headers": [[1, "v"]]},
        {**e, "dlq": {"topic": "t", "partition": -1, "offset": 0}},
    ]
    assert all(errors(b, schema) for b in broken)


def test_the_checker_refuses_keywords_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="outside the checked subset"):
        errors(1, {"type": "integer", "multipleOf": 2})
