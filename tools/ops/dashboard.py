"""`livemb dashboard --prometheus URL --out PNG`: the key panels of the Grafana dashboard, rendered
from a real Prometheus with matplotlib (for a README, an incident note, a CI artefact).

Each panel is a list of PromQL range queries over the last `--range` (or [--start, --end]); the
panels and their queries are `PANELS` below, the same expressions as
deploy/grafana/livemb-dashboard.json with the rate window as a parameter.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from livemb.core.errors import ConfigError
from livemb.core.extras import require
from livemb.core.settings import Settings
from livemb.tools.args import DashboardArgs
from livemb.tools.ops.prom import PromAPI, PrometheusError


@dataclass(frozen=True)
class Query:
    expr: str  # {w}: rate window, {sel}: the job selector, {sel,L="v"}: it with one more matcher
    legend: str  # {label} placeholders from the series' labels


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[Query, ...]
    log_y: bool = False  # latencies span ms (live) to minutes (a backfill of historic events)


def _q(level: float, metric: str) -> str:
    return f"histogram_quantile({level}, sum by (le) (rate({metric}_bucket{{sel}}[{{w}}])))"


PANELS = (
    Panel("input events / s by outcome", "events/s",
          (Query("sum by (outcome) (rate(livemb_events_total{sel}[{w}]))", "{outcome}"),)),
    Panel("DLQ records / s by reason", "records/s",
          (Query("sum by (reason) (rate(livemb_dlq_total{sel}[{w}]))", "{reason}"),
           Query("sum(rate(livemb_dlq_total{sel}[{w}])) or sum(rate(livemb_events_total{sel}[{w}])) * 0",
                 "all reasons"))),
    Panel("event-to-publish latency", "s",
          (Query(_q(0.5, "livemb_event_to_publish_seconds"), "p50"),
           Query(_q(0.99, "livemb_event_to_publish_seconds"), "p99"),
           Query(_q(0.99, "livemb_ingest_to_publish_seconds"), "ingest-to-publish p99")), log_y=True),
    Panel("consumer lag per partition", "messages",
          (Query("max by (partition) (livemb_consumer_lag{sel})", "partition {partition}"),)),
    Panel("micro-batch size", "events",
          (Query(_q(0.5, "livemb_batch_size"), "p50"), Query(_q(0.99, "livemb_batch_size"), "p99"),
           Query("sum(rate(livemb_batch_size_sum{sel}[{w}])) / sum(rate(livemb_batch_size_count{sel}[{w}]))",
                 "mean"))),
    Panel("model step / top-K time", "s",
          (Query(_q(0.5, "livemb_model_step_seconds"), "model step p50"),
           Query(_q(0.99, "livemb_model_step_seconds"), "model step p99"),
           Query(_q(0.99, "livemb_topk_seconds"), "top-K p99")), log_y=True),
    # online quality per model: champion = served, shadow = --shadow-model (docs/STREAMING.md)
    Panel("live recall@10: champion vs shadow", "recall@10",
          (Query('sum by (model) (rate(livemb_online_hits_total{sel,k="10"}[{w}])) / '
                 "sum by (model) (rate(livemb_online_targets_total{sel}[{w}]))", "{model}"),)),
    Panel("live MRR: champion vs shadow", "MRR@20",
          (Query("sum by (model) (rate(livemb_online_reciprocal_rank_total{sel}[{w}])) / "
                 "sum by (model) (rate(livemb_online_targets_total{sel}[{w}]))", "{model}"),)),
)  # fmt: skip


def fetch(api: PromAPI, start: float, end: float, step: float, window: str, job: str
          ) -> list[list[tuple[str, list[float], list[float]]]]:
    """Per panel: (legend, times, values) for every series of every query."""
    sel = f'{{job="{job}"}}' if job else ""
    out = []
    for panel in PANELS:
        lines = []
        for q in panel.queries:
            expr = re.sub(r"\{sel,([^}]*)\}", lambda m: f'{{job="{job}",{m[1]}}}' if job else f"{{{m[1]}}}", q.expr)
            expr = expr.replace("{sel}", sel).replace("{w}", window)
            for series in api.query_range(expr, start, end, step):
                labels = series["metric"]
                legend = q.legend.format_map(_Default(labels))
                ts = [float(t) for t, _ in series["values"]]
                vs = [float(v) for _, v in series["values"]]
                if panel.title.startswith("input events") and not any(vs):
                    continue  # outcomes that never happened (the worker exports every outcome at 0)
                if panel.title.startswith("live ") and all(math.isnan(v) for v in vs):
                    continue  # no target yet (0 / 0)
                lines.append((legend, ts, vs))
        out.append(lines)
    return out


class _Default(dict):
    def __missing__(self, key: str) -> str:
        return "?"


def render(data, out: str, title: str, t0: float) -> None:
    matplotlib = require("matplotlib", "the dashboard PNG")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 2, figsize=(13, 13), constrained_layout=True)
    for ax, panel, lines in zip(axes.flat, PANELS, data, strict=True):
        for legend, ts, vs in lines:
            ax.plot([t - t0 for t in ts], vs, label=legend, linewidth=1.4)
        ax.set_title(panel.title, fontsize=11)
        if panel.log_y and any(v > 0 for _, _, vs in lines for v in vs):
            ax.set_yscale("log")
        ax.set_ylabel(panel.unit)
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=8, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(title, fontsize=13)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise ConfigError(f"bad duration {text!r}: use e.g. 90s, 15m, 2h") from None


def run_dashboard(url: str, out: str, range_s: float = 900.0, step_s: float | None = None,
                  window: str = "1m", job: str = "livemb", end: float | None = None,
                  start: float | None = None) -> dict[str, int]:
    """Query and render; returns the number of series per panel. Raises ConfigError on setup mistakes."""
    api = PromAPI(url)
    end = end or time.time()
    start = start or end - range_s
    step = step_s or max(1.0, math.ceil((end - start) / 300))
    try:
        if api.targets_up() == 0 and not api.query(f'up{{job="{job}"}}' if job else "up"):
            raise ConfigError(f"Prometheus at {url} has no target for job {job!r}")
        data = fetch(api, start, end, step, window, job)
    except PrometheusError as e:  # the user's --prometheus: unreachable there is a setup mistake
        raise ConfigError(str(e)) from None
    render(data, out, f"livemb ({job or 'all jobs'}) from {url}, {end - start:.0f} s, rate window {window}", start)
    return {p.title: len(lines) for p, lines in zip(PANELS, data, strict=True)}


def cmd_dashboard(args: DashboardArgs, settings: Settings) -> int:
    """`livemb dashboard` (it reads no settings: the Prometheus URL is a flag)."""
    counts = run_dashboard(args.prometheus, args.out, parse_duration(args.range), window=args.window, job=args.job)
    empty = [t for t, n in counts.items() if n == 0]
    print(f"wrote {args.out}: {sum(counts.values())} series in {len(counts)} panels"
          + (f" (no data: {', '.join(empty)})" if empty else ""))
    return 0
