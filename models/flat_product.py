"""The flat search's product <u, x_i> over the whole catalogue, in the layout this CPU multiplies fastest.

The scores are u (B, D) x vecs.T, where the item vectors are stored row-major (N+1, D). BLAS can
read them as they are (a transposed operand) or from an item-major copy (D, N+1). The results are
the same float32 products (bit-identical from 2 users up on the hosts measured; at 1 user BLAS
takes a matrix-vector path whose sums may differ in the last bits), but the speed is not: on an
Intel Xeon host with AVX-512 the copy made the product 1.9x / 1.8x / 1.3x faster for 3 / 10 /
30 users at 50,000 items (docs/BENCHMARKS.md "The flat product's layout"), and which layout
wins depends on the CPU and its BLAS. So the choice is measured once per catalogue, when the
served model is loaded (`choose`): both layouts are timed on the catalogue itself, and the copy
is kept only where it is faster. It costs a second copy of the vectors (N x D float32: 12.8 MB at
50,000 items, 256 MB at 1M), which is why the slower case keeps none. On a GPU the product is
not the bottleneck and the choice is not measured: the vectors are read as they are.
"""

from __future__ import annotations

import logging
import time

import torch

from livemb.core.choices import FLAT_LAYOUTS

log = logging.getLogger(__name__)

LAYOUTS = FLAT_LAYOUTS[1:]  # rows: vecs (N+1, D) read transposed; items: an item-major (D, N+1) copy
PROBE_USERS = (3, 16)  # the live batch sizes the choice is timed at
PROBE_REPS = 5
KEEP_COPY_BELOW = 0.85  # the item-major copy is kept when its probe time is under this share of the other's


class FlatProduct:
    """`product(u, vecs, out)`: out (B, N+1) = u (B, D) @ vecs.T, through the chosen layout."""

    def __init__(self) -> None:
        self.layout = "rows"
        self.timings: dict[str, float] = {}  # layout -> ms for the probe batches (the choice's evidence)
        self._vecs: torch.Tensor | None = None  # the tensor the copy was made from
        self._version = -1
        self._items_major: torch.Tensor | None = None

    def choose(self, vecs: torch.Tensor, layout: str = "auto") -> str:
        """Pick the layout for these item vectors: `auto` times both on them (CPU), else force one."""
        if layout not in FLAT_LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(FLAT_LAYOUTS)}, got {layout!r}")
        if layout == "auto":
            layout = "rows" if vecs.device.type != "cpu" else self._measure(vecs)
        self.layout = layout
        self._keep(vecs if layout == "items" else None)
        return layout

    def __call__(self, u: torch.Tensor, vecs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.layout == "items":
            if vecs is not self._vecs or vecs._version != self._version:
                self._keep(vecs)  # the vectors were replaced or edited since the choice
            return torch.mm(u, self._items_major, out=out)
        return torch.mm(u, vecs.float().T, out=out)

    def _keep(self, vecs: torch.Tensor | None) -> None:
        self._vecs = vecs
        self._version = -1 if vecs is None else vecs._version
        self._items_major = None if vecs is None else vecs.detach().float().T.contiguous()

    def _measure(self, vecs: torch.Tensor) -> str:
        vecs = vecs.detach().float()
        operands = {"rows": vecs.T, "items": vecs.T.contiguous()}
        gen = torch.Generator().manual_seed(0)
        best = {name: 0.0 for name in LAYOUTS}
        for users in PROBE_USERS:
            u = torch.randn(users, vecs.shape[1], generator=gen)
            out = torch.empty(users, vecs.shape[0])
            runs: dict[str, list[float]] = {name: [] for name in LAYOUTS}
            for _ in range(PROBE_REPS):  # alternating, so that a busy moment hits both
                for name in LAYOUTS:
                    t0 = time.perf_counter()
                    torch.mm(u, operands[name], out=out)
                    runs[name].append(time.perf_counter() - t0)
            for name in LAYOUTS:
                best[name] += min(runs[name]) * 1e3
        self.timings = best
        # the copy costs memory: keep it only for a clear gain, not for the timer's noise
        choice = "items" if best["items"] < KEEP_COPY_BELOW * best["rows"] else "rows"
        log.info("flat product over %d items: %s layout (%s ms for batches of %s users)", vecs.shape[0] - 1, choice,
                 " vs ".join(f"{name} {best[name]:.2f}" for name in LAYOUTS), "+".join(map(str, PROBE_USERS)))
        return choice
