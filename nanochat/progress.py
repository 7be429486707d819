"""Progress of a training loop: a tqdm bar on a terminal, and log lines that read well in a file.

Piped to a file, a tqdm bar leaves carriage-return fragments, so the bar shows only when stderr is a
terminal. Every log line starts with step/total and ends with the elapsed time and an ETA (the mean
time per step so far, evaluation included, times the steps left).
"""

import sys
import time

from tqdm import tqdm


def bar(*args, enabled: bool = True, **kwargs):
    """A tqdm bar shown only when stderr is a terminal (in a file its carriage returns leave fragments)."""
    return tqdm(*args, disable=not (enabled and sys.stderr.isatty()), **kwargs)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True):
        self.total, self.step, self.first, self.enabled = total, initial, initial, enabled
        self.start = time.perf_counter()
        self.bar = bar(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0, enabled=enabled)

    def update(self, **postfix):
        """One step done; postfix: short values shown next to the bar."""
        self.step += 1
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix(**postfix, refresh=False)

    def eta(self) -> float:
        done = self.step - self.first
        return (time.perf_counter() - self.start) / done * (self.total - self.step) if done else float("nan")

    def log(self, text: str):
        """A log line: step/total, text, elapsed, ETA."""
        elapsed = time.perf_counter() - self.start
        eta = self.eta()
        self.write(f"step {self.step:5d}/{self.total} | {text} | elapsed {format_duration(elapsed)} | "
                   f"eta {format_duration(eta) if eta == eta else '?'}")

    def write(self, text: str):
        if self.enabled:
            self.bar.write(text, file=sys.stdout)

    def close(self):
        self.bar.close()
