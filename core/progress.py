"""Progress that reads well everywhere: a tqdm bar on a terminal, periodic log lines elsewhere.

`progress(...)` takes tqdm's arguments. When stderr is a terminal it returns a tqdm bar; when it is
not (CI, `make demo 2> file`, a container log) it returns `LogProgress`, which logs one line every
`interval_s` seconds and one at the end, each with the count, the percentage, the rate and the
elapsed time, instead of thousands of carriage-return frames. Every progress bar in tools/ and
stream/ goes through here.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("livemb.progress")


def interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, interval_s: float = 10.0, tty: bool | None = None, **tqdm_kw: Any):
    """A tqdm bar on a terminal, a LogProgress otherwise (tty=None: decide from stderr)."""
    if tty if tty is not None else interactive():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, **tqdm_kw)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, disable=disable, interval_s=interval_s)


class LogProgress:
    """The subset of tqdm the project uses (iterate, update, set_postfix, close, context manager)."""

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", disable: bool = False, interval_s: float = 10.0, clock=time.monotonic,
                 logger: logging.Logger | None = None) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.disable, self.interval_s, self.clock = disable, interval_s, clock
        self.log = logger or log
        self.n = 0
        self.postfix = ""
        self.t0 = clock()
        self._next = self.t0 + interval_s
        self._closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("LogProgress without an iterable is updated with update(n)")
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kw: Any) -> None:
        items = {**(ordered_dict or {}), **kw}
        self.postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        if now >= self._next:
            self._next = now + self.interval_s
            self._emit(now)

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        dt = max(now - self.t0, 1e-9)
        count = f"{self.n:g}/{self.total:g} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else \
            f"{self.n:g} {self.unit}"
        text = f"{self.desc}: {count}, {self.n / dt:,.0f} {self.unit}/s, {dt:.1f}s elapsed"
        if self.total and self.n:
            text += f", ~{(self.total - self.n) * dt / self.n:.0f}s left" if self.n < self.total else ""
        return text + (f" [{self.postfix}]" if self.postfix else "")

    def _emit(self, now: float) -> None:
        if not self.disable:
            self.log.info("%s", self.line(now))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._emit(self.clock())
