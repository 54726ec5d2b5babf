"""Experiment (issue 8, fourth pass): hiertcn with ModelConfig.gate = "open", defaults otherwise.

    python -m tools.exp_gate_open LOG ITEMS OUT.json
"""

import json
import logging
import sys

from core.items import ItemTable
from models.train import TrainConfig
from tools.evaluate import run_evaluation
from tools.offline import load_log

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data, items, out = sys.argv[1:4]
    rep = run_evaluation(load_log(data, None, "ms"), ItemTable.load(items), ["hiertcn"], TrainConfig(),
                         model_overrides={"gate": "open", "session_gap_ms": 1_800_000}, progress=False)
    rep["dataset"].update(source=data, note="hiertcn gate=open (tools/exp_gate_open.py)")
    with open(out, "w") as f:
        json.dump(rep, f, indent=2)
