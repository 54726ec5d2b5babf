"""One micro-batch from consumed records to written state: the worker's whole per-batch logic.

The commit order (docs/STREAMING.md quotes this list; the code marks each step `# Step N`):

  1. Continuity: input offsets the consumer skipped inside a partition are re-read from the
     broker and put right before the record that revealed the hole (stream/gap_repair.py).
  2. Validate: each record becomes a `ValidEvent` or an `Invalid` (-> DLQ: the original record +
     its reason as headers, stream/dlq.py).
  3. Read: each touched user's row, once, under that user's own partition.
  4. Guard: every event is decided against the row's input offset (of the same topic incarnation),
     event-id memory and last_ts (state/guard.py): ok / late / duplicate / redelivered /
     too_late (-> DLQ). A row that
     cannot be read refuses that user's events (-> DLQ) and is kept for inspection.
  5. Process: ONE processor call for the batch's applied events -> a new state and one output
     per user. It runs on the event loop's thread: on a compute thread every torch op had to
     take the GIL back from the busy loop, which made live batches 3-8x slower (docs/BENCHMARKS.md).
     A user whose stored state the processor refuses (unreadable, another model's) goes to the
     DLQ alone; a processor failure sends the batch's applied events to the DLQ.
  6. Publish: outputs and DLQ records are sent, and the step waits for the broker's acks.
     With a shadow model (stream/shadow.py), the shadow then steps the same applied events from
     its own stored states (after the acks: the served messages do not wait for it); it publishes
     nothing to `topic_out` (its messages go to `<topic_out>.shadow` with shadow_publish, acked
     here too) and cannot fail the batch.
  7. Write: ONE put per touched user = new state + guard (input offset, dedupe memory, last_ts)
     + the shadow's new state, all in one value.
  8. Commit: the caller acks the records; Faust flushes the changelog producer, then commits
     the consumer offsets.

A crash before step 7 replays the batch: outputs and DLQ records repeat (at-least-once), state
is written once. A crash after 7 (or part-way through it) re-delivers events whose offsets the
written rows already hold: they are skipped as redelivered, the rest apply (state exactly-once).
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from livemb.core.events import ValidEvent
from livemb.core.outcomes import DlqReason, Outcome
from livemb.core.settings import Settings
from livemb.state.guard import BatchPlan, plan_batch, wrap
from livemb.stream.contracts import OUTPUT_HEADERS
from livemb.stream.dlq import dead_letter
from livemb.stream.gap_repair import OffsetContinuity
from livemb.stream.metrics import Metrics
from livemb.stream.ports import BatchProcessor, InputLog, InputRecord, OutputRecord, OutputSink, StateStore, StepResult
from livemb.stream.shadow import Shadow, ShadowResult
from livemb.stream.validate import Invalid, reject, too_late, validate

log = logging.getLogger("livemb.worker")

Partition = tuple[str, int]  # (topic, partition)


class Step(enum.StrEnum):
    """The steps of the commit order above, by name: the `step` label of livemb_batch_step_seconds
    and the crash-injection points of the recovery tests (tests/test_batch_step.py)."""

    GAPS = "gaps"  # 1
    VALIDATE = "validate"  # 2
    READ = "read"  # 3
    GUARD = "guard"  # 4
    PROCESS = "process"  # 5
    PUBLISH = "publish"  # 6
    WRITE = "write"  # 7
    COMMIT = "commit"  # 8: the caller's (ack; Faust commits), so not timed here


TIMED_STEPS = tuple(Step)[:7]  # steps 1-7, in order


@dataclass
class BatchReport:
    """What one batch did: the counters the metrics get, and what tests assert on."""

    counts: Counter[Outcome] = field(default_factory=Counter)  # livemb_events_total, one outcome per event
    dlq: Counter[DlqReason] = field(default_factory=Counter)  # DLQ records by reason
    outputs: int = 0
    new_users: int = 0
    sessions_started: int = 0
    gap_records: int = 0
    applied: list[ValidEvent] = field(default_factory=list)  # events applied to state (the idle sweep's index)


class BatchStep:
    def __init__(
        self,
        settings: Settings,
        processor: BatchProcessor,
        store: StateStore,
        sink: OutputSink,
        metrics: Metrics | None = None,
        gaps: InputLog | None = None,
        shadow: Shadow | None = None,
    ) -> None:
        self.settings, self.processor, self.store, self.sink = settings, processor, store, sink
        self.metrics, self.gaps, self.shadow = metrics, gaps, shadow
        self.continuity = OffsetContinuity()
        self.log_ids: dict[str, int] = {}  # topic -> id of its incarnation, refreshed per assignment
        self.lateness_ms = int(settings.max_lateness_s * 1000)
        # livemb_batch_step_seconds{step} of steps 1-7: the labelled series, looked up once
        self.step_hists = [metrics.batch_step.labels(s.value) for s in TIMED_STEPS] if metrics is not None else []

    def forget(self, partitions: Sequence[Partition]) -> None:
        """Partitions revoked from this worker: their continuity restarts at the next record seen."""
        self.continuity.forget(partitions)

    async def run(self, records: Sequence[InputRecord]) -> BatchReport:
        marks = [time.perf_counter()]  # after each step: livemb_batch_step_seconds{step}
        report = BatchReport()
        anchor = {(r.topic, r.partition): r for r in records}  # a consumed record per partition
        records = await self.repair_gaps(records, report)  # Step 1
        self.finished(Step.GAPS, marks)
        valid, bad = self.validate(records)  # Step 2
        invalid = len(bad)
        self.finished(Step.VALIDATE, marks)
        rows, at = self.read_rows(valid, anchor)  # Step 3
        self.finished(Step.READ, marks)
        plan = self.guard(valid, rows, bad)  # Step 4
        self.finished(Step.GUARD, marks)
        result, failed = self.process(plan, bad, report)  # Step 5
        self.finished(Step.PROCESS, marks)
        published = await self.publish(result, bad)  # Step 6
        shadow = await self.step_shadow(plan, result)  # Step 6, after the acks: the shadow model
        self.finished(Step.PUBLISH, marks)
        self.write_states(plan, result, at, rows, report, shadow)  # Step 7
        self.finished(Step.WRITE, marks)
        report.applied = [e for e in plan.to_apply if e.user_id in result.states]
        report.counts = outcomes(invalid, plan, failed, result.unknown_items)
        # Step 8 is the caller's: ack the records; Faust then commits the offsets.
        self.observe(records, result, bad, report, {e.user_id: e.ts for e in plan.to_apply}, marks, published)
        self.observe_shadow(shadow)
        return report

    def finished(self, step: Step, marks: list[float]) -> None:
        """End of one of steps 1-7: its end time for the metrics. The tests crash the worker here,
        between two steps, by overriding this (tests/inmemory.py)."""
        marks.append(time.perf_counter())

    # ------------------------------------------------------------------ the steps
    async def repair_gaps(self, records: Sequence[InputRecord], report: BatchReport) -> list[InputRecord]:
        """Step 1. The re-read records of a hole go right before the record that revealed it, so
        every partition stays in offset order: put before the whole batch, they would overtake the
        same partition's earlier records in it, which the offset guard then takes for redeliveries
        (tests/test_batch_step.py). A partition's first batch since its assignment is checked against
        the group's committed offset (Faust 0.15.3 can drop the very first records it fetched), and
        the topic's incarnation id is refreshed: offsets of a re-created topic (a broker that lost
        its log) are not comparable with the stored ones."""
        keys = [(r.topic, r.partition) for r in records]
        if self.gaps is not None:
            await self.refresh_log_ids(records)
            await self.seed_from_commits(self.continuity.unseen(keys))
        holes = self.continuity.observe([(k, r.offset) for k, r in zip(keys, records, strict=True)])
        if not holes:
            return list(records)
        before: dict[int, list[InputRecord]] = {}  # record index -> the hole's records to put before it
        for (topic, partition), first, end, at in holes:
            log.warning("input %s[%d]: offsets %d..%d were skipped by the consumer; re-reading them",
                        topic, partition, first, end - 1)
            report.gap_records += end - first
            if self.gaps is not None:
                before.setdefault(at, []).extend(await self.gaps.read(topic, partition, first, end))
        return [x for i, r in enumerate(records) for x in (*before.get(i, ()), r)]

    async def refresh_log_ids(self, records: Sequence[InputRecord]) -> None:
        """Part of step 1: ask for the topic's incarnation id when a partition is new since the
        assignment or its offsets went back without a rebalance (aiokafka resets the position
        when a topic is re-created). A changed id starts the topic's partitions over."""
        assert self.gaps is not None
        check: dict[str, None] = {}
        for r in records:
            exp = self.continuity.expected.get((r.topic, r.partition))
            if exp is None or r.offset < exp - 1:
                check[r.topic] = None
        for topic in check:
            new = await self.gaps.log_id(topic)
            old = self.log_ids.get(topic)
            if new is None:  # lookup failed: a transient error is no evidence of a new log
                continue
            if old is not None and new != old:
                log.warning("input topic %s was re-created (log id %08x -> %08x): its offsets start over; "
                            "events from the new log are applied, none is taken for a redelivery", topic, old, new)
                self.continuity.forget([k for k in self.continuity.expected if k[0] == topic])
            self.log_ids[topic] = new

    async def seed_from_commits(self, fresh: Sequence[Partition]) -> None:
        """Part of step 1: expect the group's committed offset as the first offset of a partition
        new since the assignment (Faust 0.15.3 can drop the very first records it fetched)."""
        assert self.gaps is not None
        for topic in dict.fromkeys(t for t, _ in fresh):
            committed = await self.gaps.committed(topic, [p for t, p in fresh if t == topic])
            for p, off in committed.items():
                self.continuity.seed((topic, p), off)

    def validate(self, records: Sequence[InputRecord]) -> tuple[list[ValidEvent], list[Invalid]]:
        """Step 2."""
        now_ms = int(time.time() * 1000)
        valid: list[ValidEvent] = []
        bad: list[Invalid] = []
        for r in records:
            v = validate(r.value, r.topic, r.partition, r.offset, now_ms, self.settings, key=r.key, headers=r.headers)
            (bad if isinstance(v, Invalid) else valid).append(v)
        return valid, bad

    def read_rows(self, valid: Sequence[ValidEvent], anchor: dict[Partition, InputRecord]
                  ) -> tuple[dict[str, bytes | None], dict[str, InputRecord]]:
        """Step 3. One read per user, addressed under a consumed record of the user's partition
        (also the address of the user's write in step 7)."""
        rows: dict[str, bytes | None] = {}
        at: dict[str, InputRecord] = {}
        for ev in valid:
            if ev.user_id not in at:
                at[ev.user_id] = anchor[(ev.topic, ev.partition)]
                rows[ev.user_id] = self.store.get(ev.user_id, at[ev.user_id])
        return rows, at

    def guard(self, valid: Sequence[ValidEvent], rows: dict[str, bytes | None], bad: list[Invalid]) -> BatchPlan:
        """Step 4."""
        plan = plan_batch(valid, rows, self.settings.dedupe_memory, self.lateness_ms, self.log_ids)
        for uid, err in plan.unreadable.items():
            log.error("state row of user %r is unreadable, its events go to the DLQ: %s", uid, err)
        bad.extend(reject(e, DlqReason.STATE_UNREADABLE) for e in plan.rejected)
        bad.extend(too_late(e) for e in plan.too_late())
        return plan

    def process(self, plan: BatchPlan, bad: list[Invalid], report: BatchReport
                ) -> tuple[StepResult, list[ValidEvent]]:
        """Step 5. Also returns the applied events that went to the DLQ after all (outcome error)."""
        if not plan.to_apply:
            return StepResult(states={}, outputs=[]), []
        states = {e.user_id: plan.inner[e.user_id] for e in plan.to_apply}
        try:
            result = self.processor.process(plan.to_apply, states)
        except Exception:  # noqa: BLE001 - a model bug must not kill the worker or lose events silently
            log.exception("processor failed on a batch of %d events; they go to the DLQ", len(plan.to_apply))
            bad.extend(reject(e, DlqReason.PROCESSING_ERROR) for e in plan.to_apply)
            return StepResult(states={}, outputs=[]), list(plan.to_apply)
        refused: list[ValidEvent] = []
        if result.rejected:
            for uid, why in result.rejected.items():
                log.error("stored state of user %r refused by the processor, its events go to the DLQ: %s", uid, why)
            refused = [e for e in plan.to_apply if e.user_id in result.rejected]
            bad.extend(reject(e, DlqReason.STATE_UNREADABLE) for e in refused)
        report.sessions_started += result.sessions_started
        return result, refused

    async def step_shadow(self, plan: BatchPlan, result: StepResult) -> ShadowResult:
        """Step 6, second part: the shadow steps the applied events of the users whose new state
        step 7 writes (none when the served model failed the batch: no state changes then), and
        its messages (shadow_publish) are sent and acked."""
        if self.shadow is None:
            return ShadowResult()
        events = [e for e in plan.to_apply if e.user_id in result.states]
        out = self.shadow.step(events, {e.user_id: plan.shadow.get(e.user_id) for e in events})
        if out.outputs:
            await self.sink.publish(out.outputs)
        return out

    async def publish(self, result: StepResult, bad: Sequence[Invalid]) -> tuple[float, float]:
        """Step 6. Returns once the broker acknowledged every output and DLQ record, with the
        time of that moment (wall-clock ms, perf_counter s) for the latency metrics."""
        s, now_ms = self.settings, int(time.time() * 1000)
        out = [OutputRecord(s.topic_out, u.encode(), v, OUTPUT_HEADERS) for u, v in result.outputs]
        out += [dead_letter(b, s.topic_dlq, now_ms) for b in bad]
        if result.new_item_evidence is not None:  # one partition: every worker reads it in one order
            out.append(OutputRecord(s.new_item_topic, None, result.new_item_evidence, (), partition=0))
        if out:
            await self.sink.publish(out)
        return time.time() * 1000, time.perf_counter()

    def write_states(self, plan: BatchPlan, result: StepResult, at: dict[str, InputRecord],
                     rows: dict[str, bytes | None], report: BatchReport, shadow: ShadowResult) -> None:
        """Step 7. One put per touched user (a refused user's row is kept as it is). The shadow's
        blob rides in the same value: its new one, else the stored one; none without a shadow."""
        for uid in rows:  # first-appearance order: a crash part-way leaves a deterministic prefix
            if uid not in plan.dirty or uid in result.rejected:
                continue
            sh = shadow.states.get(uid, plan.shadow.get(uid)) if self.shadow is not None else None
            self.store.put(uid, wrap(plan.guards[uid], result.states.get(uid, plan.inner[uid]), sh), at[uid])
            report.new_users += rows.get(uid) is None

    def observe(self, records: Sequence[InputRecord], result: StepResult, bad: Sequence[Invalid],
                report: BatchReport, last_ts: dict[str, int], marks: list[float], published: tuple[float, float]
                ) -> None:
        """Metrics of the batch (after the commit-order steps; nothing here can lose an event)."""
        m = self.metrics
        report.outputs = len(result.outputs)
        report.dlq.update(b.reason for b in bad)
        if m is None:
            return
        pub_ms, elapsed = published[0], published[1] - marks[0]
        m.batch_size.observe(len(records))
        for hist, (a, b) in zip(self.step_hists, pairwise(marks), strict=True):
            hist.observe(b - a)
        if result.outputs:
            m.model_step.observe(result.model_step_seconds)
            m.topk.observe(result.topk_seconds)
        if result.quality is not None:
            m.observe_quality(result.quality, "champion")
        for u, _ in result.outputs:
            m.event_to_publish.observe(max(0.0, (pub_ms - last_ts[u]) / 1000))
            m.ingest_to_publish.observe(elapsed)
        m.count(report.counts)
        m.users_in_state.inc(report.new_users)
        m.sessions_started.inc(report.sessions_started)
        m.outputs.inc(report.outputs)
        m.input_gaps.inc(report.gap_records)
        for reason, n in report.dlq.items():
            m.dlq.labels(reason).inc(n)

    def observe_shadow(self, shadow: ShadowResult) -> None:
        """The shadow's metrics (model="shadow")."""
        m = self.metrics
        if m is None or self.shadow is None:
            return
        info = self.shadow.model_info()
        if info is not None:
            m.set_shadow_model(info.model, info.version, info.device)
        if shadow.seconds:
            m.shadow_step.observe(shadow.seconds)
        if shadow.quality is not None:
            m.observe_quality(shadow.quality, "shadow")
        if shadow.failed:
            m.shadow_failures.inc()
        m.shadow_restarts.inc(shadow.restarted)


def outcomes(invalid: int, plan: BatchPlan, failed: Sequence[ValidEvent], unknown_items: int) -> Counter[Outcome]:
    """livemb_events_total of one batch, one outcome per event, taken once the step knows which
    applied events failed: `invalid` records, the events of unreadable rows (error), and each
    guarded event's decision, unless it was applied and then failed in step 5 (error).
    unknown_item is the processor's tag on top of an applied event's ok / late (SPEC section 2)."""
    failed_ids = {id(e) for e in failed}  # the very objects of plan.to_apply (offsets may repeat across topics)
    counts = Counter({Outcome.INVALID: invalid, Outcome.ERROR: len(plan.rejected)})
    counts.update(Outcome.ERROR if id(e) in failed_ids else d for e, d in plan.decisions)
    counts[Outcome.UNKNOWN_ITEM] += unknown_items
    return +counts  # without zero entries
