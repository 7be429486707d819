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


class StepTelemetry:
    """One optimizer step of MC training as the log sees it: metrics averaged over the micro-batches, phase
    seconds summed (read from the controller's timer after each micro-batch and after the update)."""

    def __init__(self, timer: PhaseTimer):
        self.timer = timer
        self.metrics, self.times = {}, {}

    def phase(self, name: str):
        return self.timer.phase(name)

    def add(self, metrics: dict, micro_batches: int):
        """A micro-batch's metrics (one of micro_batches in the step) and the phases timed since the last call."""
        for key, value in metrics.items():
            self.metrics[key] = self.metrics.get(key, 0.0) + value / micro_batches
        self.collect()

    def collect(self):
        for key, value in self.timer.pop().items():
            self.times[key] = self.times.get(key, 0.0) + value

    def log_line(self, step_seconds: float) -> str:
        return format_log(self.metrics, self.times, step_seconds)

    def wandb(self) -> dict:
        return {**{f"mc/{k}": v for k, v in self.metrics.items()}, **{f"mc_time/{k}": v for k, v in self.times.items()}}

    def reset(self):
        self.metrics, self.times = {}, {}


class NoTelemetry:
    """StepTelemetry's shape for plain training: nothing timed, nothing logged."""

    def phase(self, name: str):
        return contextlib.nullcontext()

    def add(self, metrics: dict, micro_batches: int):
        pass

    def collect(self):
        pass

    def log_line(self, step_seconds: float) -> str:
        return ""

    def wandb(self) -> dict:
        return {}

    def reset(self):
        pass
