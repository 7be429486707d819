"""Per-phase timing of the MegaContext step, each phase also a span of the step's trace (nanochat.tracing).

`PhaseTimer.phase(name)` times a block (synchronising CUDA so GPU work is counted where it happens),
accumulates seconds per phase name and, when tracing is on, wraps the block in a span `mc.<name>`.
`format_log` turns a step's MC metrics and phase times into one console line.
"""

import contextlib
import time
from collections import defaultdict

import torch

from nanochat import tracing


class PhaseTimer:
    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds = defaultdict(float)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        with tracing.span(f"mc.{name}"):
            self._sync()
            t0 = time.perf_counter()
            yield
            self._sync()
            self.seconds[name] += time.perf_counter() - t0

    def pop(self) -> dict:
        """Seconds per phase since the last pop."""
        out = dict(self.seconds)
        self.seconds.clear()
        return out


def format_log(metrics: dict, times: dict, step_seconds: float) -> str:
    """One console line of MegaContext telemetry: losses, counterfactual NLLs, LOD mix, phase shares."""
    lod = "/".join(f"{metrics[k]:.2f}" for k in sorted(metrics) if k.startswith("lod"))
    phases = " ".join(f"{k} {100 * v / step_seconds:.0f}%" for k, v in times.items())
    bag = f"bag {metrics['bag_loss']:.3f} | " if "bag_loss" in metrics else ""
    return (f"      mc | lm {metrics['lm_loss']:.3f} | lens {metrics['lens_loss']:.3f} hit {metrics['lens_hit']:.2f} | "
            f"last-H nll trunc {metrics['nll_h_truncation']:.3f} var {metrics['nll_h_variants']:.3f} "
            f"best {metrics['nll_h_best']:.3f} |dnll| {metrics['dnll_abs']:.4f} | expansions {metrics['expansions']:.1f} | "
            f"lod mix {lod} | {bag}{phases}")
