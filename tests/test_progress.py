"""core/progress.py: log lines with rates off a terminal, a tqdm bar on one."""

from __future__ import annotations

import logging

from livemb.core.progress import LogProgress, progress


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_log_lines_every_interval_with_rate_and_a_final_line(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="livemb.progress")
    bar = LogProgress(range(1000), desc="replay", unit="ev", interval_s=10.0, clock=clock)
    for k, _ in enumerate(bar):
        clock.t = (k + 1) * 0.05  # 20 events per second
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 + 1, lines  # at 10, 20, 30, 40, 50 s, then the final line from close()
    assert lines[0].startswith("replay: 200/1000 ev (20%), 20 ev/s, 10.0s elapsed, ~40s left"), lines[0]
    assert lines[-1].startswith("replay: 1000/1000 ev (100%), 20 ev/s, 50.0s elapsed"), lines[-1]
    assert all("\r" not in x for x in lines)


def test_update_total_postfix_and_disable(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="livemb.progress")
    with LogProgress(total=None, desc="train", interval_s=1.0, clock=clock) as bar:
        clock.t = 2.0
        bar.set_postfix(loss=0.123456)
        bar.update(50)
    assert [r.getMessage() for r in caplog.records] == ["train: 50 it, 25 it/s, 2.0s elapsed [loss=0.1235]"] * 2
    caplog.clear()
    with LogProgress(total=10, disable=True, clock=clock) as bar:
        bar.update(10)
    assert caplog.records == []


def test_progress_picks_tqdm_on_a_terminal_and_log_lines_elsewhere():
    from tqdm import tqdm

    assert isinstance(progress(range(3), tty=False), LogProgress)
    bar = progress(range(3), tty=True, disable=True)
    assert isinstance(bar, tqdm)
    assert progress(range(7), tty=False).total == 7
