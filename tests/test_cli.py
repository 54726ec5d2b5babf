"""The offline CLI end to end on tiny data: synth -> item-embeddings -> train -> embed -> evaluate."""

import json
from pathlib import Path

import orjson
import pytest

from livemb.core.errors import ConfigError
from livemb.tools.cli import main


def test_offline_pipeline(tmp_path, capsys):
    log, items, ckpt = tmp_path / "log.csv", tmp_path / "items.npz", tmp_path / "m.pt"
    assert main(["synth", "--users", "30", "--items", "60", "--days", "4", "--out", str(log)]) == 0
    assert main(["item-embeddings", "--data", str(log), "--dim", "8", "--out", str(items)]) == 0
    assert main(["train", "--data", str(log), "--items", str(items), "--model", "hiertcn", "--out", str(ckpt),
                 "--epochs", "1"]) == 0
    out = tmp_path / "users.jsonl"
    assert main(["embed", "--data", str(log), "--items", str(items), "--model", str(ckpt), "--out", str(out),
                 "--topk", "5"]) == 0
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(rows) == 30
    r = rows[0]
    assert set(r) == {"user_id", "dim", "embedding", "candidates", "session_id", "event_ts", "emitted_at", "model",
                      "items_version", "next_session_embedding"}  # SPEC section 5
    assert len(r["next_session_embedding"]) == 8  # hiertcn has a session hierarchy
    assert r["dim"] == len(r["embedding"]) == 8 and len(r["candidates"]) == 5 and r["model"].startswith("hiertcn@")
    js, png = tmp_path / "eval.json", tmp_path / "eval.png"
    assert main(["evaluate", "--data", str(log), "--models", "mv,sr,gru", "--epochs", "1", "--dim", "8",
                 "--json", str(js), "--plot", str(png)]) == 0
    report = json.loads(js.read_text())
    assert set(report["results"]) == {"mv", "sr", "gru"}
    for res in report["results"].values():
        assert {"recall@1", "recall@5", "recall@10", "recall@20", "mrr", "mrp", "events_scored",
                "train_seconds"} <= set(res)
        assert res["events_scored"] > 0
    assert png.stat().st_size > 1000
    assert "| mv |" in capsys.readouterr().out
    from livemb.tools.offline.results_doc import render

    doc = render(str(js), report).splitlines()
    served = report["results"]["gru"]["served_variant"]
    assert sum(line.startswith(f"| gru | {served} |") for line in doc) == 2  # its summary row and its variant row
    assert sum(line.startswith(("| mv | ", "| sr | ", "| gru | ")) for line in doc) == 3 + 3 * 9  # summary + variants
    [mv] = [line for line in doc if line.startswith("| mv | ") and "|---" not in line][:1]
    assert mv.split(" | ")[10:12] == ["-", "-"]  # a counting model: no epochs, no s/epoch


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item\n1,2\n")
    assert main(["evaluate", "--data", str(bad)]) == 2
    assert "missing" in capsys.readouterr().err
    items = tmp_path / "items.npz"
    items.write_bytes(b"garbage")
    log = tmp_path / "log.csv"
    main(["synth", "--users", "5", "--items", "20", "--days", "2", "--out", str(log)])
    assert main(["evaluate", "--data", str(log), "--items", str(items)]) == 2
    assert "not a readable .npz" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(log), "--models", "nope"]) != 0
    # a bad training flag: one line, before anything is read or written
    capsys.readouterr()
    assert main(["train", "--data", str(log), "--model", "gru", "--out", str(tmp_path / "m.pt"), "--min-steps", "-1"]) == 2
    assert "min_steps must be >= 0" in capsys.readouterr().err
    assert not list(tmp_path.glob("m.*"))  # no item vectors saved, no checkpoint
    assert main(["evaluate", "--data", str(tmp_path / "absent.csv"), "--min-steps", "-1"]) == 2
    assert "min_steps" in capsys.readouterr().err  # the flag is checked before the log is read


def test_demo_prepares_log_items_and_model(tmp_path):
    # The demo's first step (synth log, planted items, a small HierTCN) without the broker part.
    from livemb.core.items import ItemTable
    from livemb.core.settings import load_settings
    from livemb.models.checkpoint import load_checkpoint
    from livemb.tools.args import DemoArgs, from_namespace
    from livemb.tools.cli import build_parser
    from livemb.tools.harness import prepare_model

    args = from_namespace(DemoArgs, build_parser().parse_args(["demo", "--workdir", str(tmp_path)]))
    prep = prepare_model(tmp_path, load_settings(), data=args.data, model=args.model, items=args.items,
                         log_format=args.log_format)
    df, model_path, items_path = prep.log, prep.model, prep.items
    assert len(df) > 1000 and Path(items_path).exists()
    table = ItemTable.load(items_path)
    model = load_checkpoint(model_path, table.padded_vectors(), table.fingerprint)
    assert model.name == "hiertcn"


def test_seed_decides_the_trained_weights(tmp_path):
    """`--seed` fixes initial weights, batch order and negatives: the same seed gives the same
    checkpoint, another seed another one (what a spread over seeds is measured with)."""
    import torch

    from livemb.models.checkpoint import read_checkpoint

    log, items = tmp_path / "log.csv", tmp_path / "items.npz"
    assert main(["synth", "--users", "20", "--items", "40", "--days", "3", "--out", str(log)]) == 0
    assert main(["item-embeddings", "--data", str(log), "--dim", "8", "--out", str(items)]) == 0

    def weights(seed: int, name: str) -> dict:
        ckpt = tmp_path / f"{name}.pt"
        assert main(["train", "--data", str(log), "--items", str(items), "--model", "gru", "--out", str(ckpt),
                     "--epochs", "1", "--valid-fraction", "0", "--seed", str(seed)]) == 0
        return read_checkpoint(ckpt)["state_dict"]

    a, again, other = weights(3, "a"), weights(3, "again"), weights(4, "other")
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_training_summary_names_what_was_trained():
    from livemb.tools.offline.evaluate import _training_summary

    assert _training_summary({"epoch_seconds": [], "loss": []}, 0.1) == "no training"
    fixed = {"epoch_seconds": [1.0, 1.0], "chosen_epoch": 2, "early_stopping": {"used": False}}
    assert _training_summary(fixed, 2.04) == "train 2.0s, 2 epochs"
    refit = {"fit_epoch_seconds": [1.0, 1.0, 1.0], "epoch_seconds": [1.2], "chosen_epoch": 1,
             "early_stopping": {"used": True, "epochs_run": 3}}
    assert _training_summary(refit, 4.5) == "train 4.5s, 4 epochs (early stopping chose 1 of 3, refit)"


def _livemb_errors() -> dict[type, int]:
    """Every LivembError class of the project (their modules imported) -> the exit code livemb gives it."""
    import livemb.models.checkpoint
    import livemb.models.retrieval
    import livemb.state.codec
    import livemb.state.record
    import livemb.stream.broker
    import livemb.stream.kafka_io
    import livemb.tools.ops.prom
    import livemb.tools.ops.rebuild
    from livemb.core import errors

    return {
        errors.LivembError: 1, livemb.tools.ops.rebuild.RebuildError: 1,
        errors.ConfigError: 2,
        errors.DataError: 2, livemb.models.checkpoint.CheckpointError: 2, livemb.models.retrieval.IndexFileError: 2,
        livemb.state.record.StateRecordError: 2, livemb.state.codec.ForeignState: 2,
        errors.Unavailable: 3, livemb.stream.kafka_io.BrokerUnreachable: 3, livemb.stream.broker.BrokerError: 3,
        livemb.tools.ops.prom.PrometheusError: 3,
    }


def test_exit_codes_are_set_in_core_errors_only():
    from livemb.core.errors import ConfigError, DataError, LivembError, Unavailable

    table = _livemb_errors()
    tree, todo = set(), [LivembError]
    while todo:
        cls = todo.pop()
        tree.add(cls)
        todo += cls.__subclasses__()
    assert tree == set(table)  # a new error class gets its row here
    assert {cls: cls.exit_code for cls in tree} == table
    assert [cls for cls in tree if "exit_code" in vars(cls) and cls.__module__ != "livemb.core.errors"] == []
    # the classes they replaced were ValueErrors / RuntimeErrors: callers catching those still do
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    assert issubclass(Unavailable, RuntimeError)


@pytest.mark.parametrize("cls_name", sorted(c.__name__ for c in _livemb_errors()))
def test_cli_maps_each_livemb_error_to_its_exit_code_in_one_line(cls_name, monkeypatch, capsys):
    import livemb.tools.ops.config_doc

    cls, code = next((c, n) for c, n in _livemb_errors().items() if c.__name__ == cls_name)

    def fail():
        raise cls("the thing went wrong")

    monkeypatch.setattr(livemb.tools.ops.config_doc, "readme_block", fail)
    assert main(["config"]) == code
    assert capsys.readouterr().err == "livemb config: error: the thing went wrong\n"


def test_cli_exit_code_for_a_missing_file_and_a_bug(monkeypatch, capsys):
    import livemb.tools.ops.config_doc

    def missing():
        open("/nonexistent/livemb.csv")

    monkeypatch.setattr(livemb.tools.ops.config_doc, "readme_block", missing)
    assert main(["config"]) == 2
    assert capsys.readouterr().err.count("\n") == 1

    def bug():
        raise ValueError("not a livemb error: a bug")

    monkeypatch.setattr(livemb.tools.ops.config_doc, "readme_block", bug)
    with pytest.raises(ValueError, match="a bug"):  # a traceback, not a tidy exit 2
        main(["config"])


def test_replay_takes_the_log_as_train_and_evaluate_do_or_positionally():
    from livemb.tools.args import ReplayArgs, from_namespace
    from livemb.tools.cli import build_parser

    parse = build_parser().parse_args
    assert from_namespace(ReplayArgs, parse(["replay", "a.csv"])).source == "a.csv"
    assert from_namespace(ReplayArgs, parse(["replay", "--data", "b.csv", "--rate", "10"])).source == "b.csv"
    for argv in (["replay"], ["replay", "a.csv", "--data", "b.csv"]):
        with pytest.raises(ConfigError, match="replay needs the event log once"):
            _ = from_namespace(ReplayArgs, parse(argv)).source


def test_replay_without_a_log_is_one_line_and_exit_2(capsys):
    assert main(["replay", "--broker", "kafka://127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.startswith("livemb replay: error: replay needs the event log once")
