"""Experiment tracking with Weights & Biases: one run per training script, holding its whole config.

`start_run` returns a wandb run when a run name is given (on the master rank), else a no-op stand-in,
so a training loop logs unconditionally. The project is $WANDB_PROJECT (default megacontext);
WANDB_MODE=offline keeps the run on disk (`wandb sync` uploads it later).
"""

import os


class NoRun:
    """Stands in for a wandb run when tracking is off."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def start_run(name: str, job_type: str, config: dict, master: bool = True):
    """A wandb run named name (empty: tracking off) of the given job type with config (nested dicts)."""
    if not (name and master):
        return NoRun()
    import wandb
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "megacontext"), name=name, job_type=job_type,
                      config=config)


def run_link(run) -> str | None:
    """Where to find the run: its URL, or the local directory of an offline run; None when off."""
    if isinstance(run, NoRun):
        return None
    return run.url or os.path.dirname(run.dir)
