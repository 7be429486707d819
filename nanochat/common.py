"""Runtime set-up shared by every script: device, dtype policy, distributed init, seeding, paths.

Device autodetect prefers cuda, then mps, then cpu. The dtype policy is bf16 autocast on CUDA
devices that support it; on CPU it is measured (`cpu_bf16="auto"`): bf16 autocast where this CPU's bf16
matmuls are clearly faster than fp32 (native bf16 instructions, e.g. AVX512-BF16 or AMX: 2-4x here),
fp32 where bf16 is emulated (slower); "on"/"off" force it. torch.compile (`compile="auto"`) is on for CUDA, and on
CPU for runs long enough to earn back inductor's compile time (CPU_COMPILE_MIN_STEPS; it needs a C++ compiler).
Distributed runs are launched with torchrun; the backend is nccl on CUDA and gloo on CPU.
On CPU, `compute_init` also tells glibc's malloc to keep freed memory (`keep_freed_memory`).
"""

import ctypes
import ctypes.util
import glob
import os
import shutil
import sys
import random
import contextlib
import functools
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def get_base_dir() -> Path:
    """Where tokenizers, data shards and checkpoints live ($MC_BASE_DIR, default ~/.cache/megacontext)."""
    base = Path(os.environ.get("MC_BASE_DIR", Path.home() / ".cache" / "megacontext"))
    base.mkdir(parents=True, exist_ok=True)
    return base


def get_report_dir() -> Path:
    """Where report.md and plots of the last run go ($MC_REPORT_DIR, default ./report)."""
    path = Path(os.environ.get("MC_REPORT_DIR", "report"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_ddp() -> bool:
    return int(os.environ.get("RANK", -1)) != -1


def get_dist_info():
    """(ddp, rank, local_rank, world_size) from the torchrun environment."""
    if is_ddp():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


CPU_BF16_CHOICES = ["auto", "on", "off"]
CPU_BF16_MIN_SPEEDUP = 1.5  # "auto" takes bf16 when its matmuls are at least this much faster than fp32


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """bf16 over fp32 matmul throughput on this CPU, measured once per process (~0.2 s)."""
    cpu = torch.device("cpu")
    fp32 = measure_matmul_flops(cpu, torch.float32, n=512, seconds=0.1, windows=2)
    return measure_matmul_flops(cpu, torch.bfloat16, n=512, seconds=0.1, windows=2) / fp32


def autocast_dtype(device_type: str, cpu_bf16: str = "auto"):
    """The dtype to autocast matmuls to, or None for plain fp32 (see the module docstring)."""
    if cpu_bf16 not in CPU_BF16_CHOICES:
        raise ValueError(f"--cpu_bf16 must be one of {CPU_BF16_CHOICES}, got {cpu_bf16!r}")
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device_type == "cpu" and (cpu_bf16 == "on" or (cpu_bf16 == "auto" and cpu_bf16_speedup() >= CPU_BF16_MIN_SPEEDUP)):
        return torch.bfloat16
    return None


COMPILE_CHOICES = ["auto", "on", "off"]
CPU_COMPILE_MIN_STEPS = 100  # "auto" compiles on CPU only for runs of at least this many steps (~15 s a graph here)


def cpu_compiler() -> str | None:
    """The C++ compiler inductor builds CPU kernels with ($CXX, else g++ / clang++ on macOS), if installed."""
    return shutil.which(os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++"))


def use_compile(device_type: str, choice: str, steps: int) -> bool:
    """Whether to torch.compile the training model (see the module docstring)."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"--compile must be one of {COMPILE_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice == "on"
    if device_type == "cuda":
        return True
    return device_type == "cpu" and steps >= CPU_COMPILE_MIN_STEPS and cpu_compiler() is not None


def resumed_autocast_dtype(dtype, cpu_bf16: str, saved: str | None):
    """The autocast dtype of a resumed run: the one its first run chose (saved: that dtype's str, as
    checkpoints record it) when the choice was "auto", since "auto" measures speed and a busy machine can
    tip it the other way, which would break exact resume."""
    if cpu_bf16 != "auto" or saved is None:
        return dtype
    return {str(d): d for d in (None, torch.bfloat16, torch.float16)}.get(saved, dtype)


def autocast_ctx(device_type: str, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device_type, dtype=dtype)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_freed_memory() -> bool:
    """Serve every allocation from glibc's heap and never hand freed memory back to the OS (Linux/glibc; elsewhere
    a no-op, False). PyTorch on CPU frees and re-allocates the same large activations and gradients every step;
    by default glibc maps each one above 32 MB (and many smaller) afresh and unmaps it when freed, so every step
    page-faults its whole working set again: ~200k faults (~800 MB zeroed) per CPU-preset training step. Kept:
    none; `bench_mc` (2 cores) plain step 680 -> 520 ms, MC step 918 -> 698 ms. The process's RSS then stays at
    its peak instead of shrinking between steps, and aligned allocations leave a few freed copies in the heap
    (`bench_mc` peak RSS of the plain step 1,485 -> 1,938 MB)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def compute_init(device_type: str = ""):
    """Initialise device and (under torchrun) the process group. Returns (ddp, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise SystemExit(f"error: --device_type={device_type}: choose cuda, mps or cpu (or leave it empty to autodetect)")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device_type=cuda but no CUDA device is available")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("error: --device_type=mps but MPS is not available")
    ddp, rank, local_rank, world_size = get_dist_info()
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if device_type == "cpu":
        keep_freed_memory()
    if ddp and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None)
        dist.barrier()
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def atomic_write_bytes(path: Path, data: bytes):
    """Write a file via temp file + rename so a crash never leaves it half-written. A failed write removes
    its temp file and names `path`; temp files left by killed processes (`<name>.tmp<pid>` of a pid no
    longer running) are removed by the next write of that file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{glob.escape(path.name)}.tmp*"):
        pid = stale.name[len(path.name) + 4:]
        if pid.isdigit() and not pid_running(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"could not write {path}: {e.strerror}") from None


def pid_running(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_text(path: Path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def measure_matmul_flops(device: torch.device, dtype=None, n: int | None = None, seconds: float = 0.6,
                         windows: int = 3) -> float:
    """Achievable dense matmul FLOP/s of this device and dtype, measured now (the denominator of MFU): the
    best of `windows` timing windows, so a moment of contention (another process) does not lower the peak.
    n defaults to 8192 on CUDA (an H200 did 132 bf16 TFLOP/s at n=1024 but 690 at 4096 and 684 at 8192, so MFU
    at 1024 read 5x too high: 2.06 for d12) and 1024 elsewhere."""
    import time
    dtype = dtype or torch.float32
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    best = 0.0
    for _ in range(windows):
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / windows:
            for _ in range(4):
                a @ b
            iters += 4
            synchronize(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    return best
