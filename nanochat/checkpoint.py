"""Checkpoints: atomic save, safe load (weights_only), clear errors for corrupt or foreign files.

A checkpoint of step S in a directory holds
    model_S.pt          {name: state_dict} of every module ("gpt"; with MegaContext also "mc_gist", "mc_lens")
    optim_S_rankR.pt    optimizer states and RNG state of rank R (only needed to resume)
    meta_S.json         model config, training config, loader state, metrics
The meta file is written last, so a checkpoint counts as complete only once it exists. It records the
SHA-256 of every file of the checkpoint (`sha256`: file name -> digest; other ranks' optimizer files
as rank 0 reads them after a barrier), verified on every load, so a file changed on disk is refused
instead of loading other weights (checkpoints from before load unchecked).
"""

import hashlib
import io
import json
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.common import atomic_write_bytes, atomic_write_text, get_base_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer

FORMAT_VERSION = 1
LEGACY_MODEL_CONFIG = {"smear": "none", "vocab_multiple": 1, "value_embeds": False}  # fields a checkpoint written before they existed was trained without


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt, truncated or incompatible; the message names the file."""


def checkpoint_dir(stage: str, tag: str) -> Path:
    """base_dir/checkpoints/<stage>/<tag>, e.g. checkpoints/base/d4."""
    return get_base_dir() / "checkpoints" / stage / tag


def resolve_checkpoint_dir(stage: str, tag: str = "") -> Path:
    """checkpoints/<stage>/<tag>; with no tag, the most recently written one of that stage (runs moved aside by
    --overwrite are not candidates)."""
    if tag:
        return checkpoint_dir(stage, tag)
    stage_dir = get_base_dir() / "checkpoints" / stage
    candidates = [p for p in stage_dir.iterdir() if p.is_dir() and ".replaced-" not in p.name] if stage_dir.exists() else []
    if not candidates:
        raise CheckpointError(f"no {stage} checkpoints in {stage_dir} (train one first)")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def _torch_save_atomic(obj, path: Path) -> str:
    """Write obj atomically; returns the SHA-256 of the bytes written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _recorded_digest(path: Path) -> str | None:
    """The SHA-256 the meta file of `path`'s step records for it (None: not recorded, or no readable meta)."""
    step = re.search(r"_(\d{6})(?:_rank\d+)?\.pt$", path.name)
    meta_path = path.parent / f"meta_{step.group(1)}.json" if step else None
    try:
        return json.loads(meta_path.read_text()).get("sha256", {}).get(path.name) if meta_path else None
    except (OSError, ValueError, AttributeError):
        return None


def _torch_load(path: Path, device):
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    data = path.read_bytes()
    digest = _recorded_digest(path)
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"checkpoint file {path} has changed since it was written (its SHA-256 differs from the "
                              "one in its meta file): it is corrupt; restore it or train again")
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as e:  # any parse failure of foreign bytes (pickle raises a zoo of types)
        raise CheckpointError(f"checkpoint file {path} is not a readable checkpoint: corrupt, truncated or another kind "
                              f"of file ({load_error_reason(e)})") from None


def load_error_reason(e: Exception) -> str:
    """Why torch.load (weights_only) refused a file, in one line and without torch's advice to load it unsafely."""
    text = str(e)
    if "Weights only load failed" in text:
        return "it holds Python objects besides tensors; they are refused, since loading them could run code"
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0][:200]}"


def save_checkpoint(directory, step: int, modules: dict, optimizers, meta: dict, rank: int = 0, rank_state=None):
    """Save the state dicts of modules {name: module or a state dict} (rank 0), this rank's optimizer + RNG +
    `rank_state` (e.g. its data loader position), then the meta file (rank 0)."""
    directory = Path(directory)
    digests = {}
    if rank == 0:
        model_file = f"model_{step:06d}.pt"
        digests[model_file] = _torch_save_atomic({key: m if isinstance(m, dict) else m.state_dict() for key, m in modules.items()},
                                                     directory / model_file)
    if optimizers is not None:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        state = {"optimizers": [opt.state_dict() for opt in optimizers], "rng": rng, "rank_state": rank_state}
        optim_file = f"optim_{step:06d}_rank{rank}.pt"
        digests[optim_file] = _torch_save_atomic(state, directory / optim_file)
    if optimizers is not None and dist.is_initialized():
        dist.barrier()  # every rank's optimizer file is complete before rank 0 records its digest
    if rank == 0:
        for other in sorted(directory.glob(f"optim_{step:06d}_rank*.pt")):
            digests.setdefault(other.name, hashlib.sha256(other.read_bytes()).hexdigest())
        meta = dict(meta, step=step, format_version=FORMAT_VERSION, sha256=digests)
        atomic_write_text(directory / f"meta_{step:06d}.json", json.dumps(meta, indent=2))


def find_last_step(directory) -> int:
    directory = Path(directory)
    steps = [int(m.group(1)) for f in directory.glob("meta_*.json") if (m := re.fullmatch(r"meta_(\d+)\.json", f.name))]
    steps = [s for s in steps if (directory / f"model_{s:06d}.pt").exists()]
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {directory} (train one first, e.g. `python -m scripts.base_train`)")
    return max(steps)


def claim_run_dir(directory, overwrite: bool, rank: int = 0):
    """A new run (not --resume) writes into an unused directory: one that holds checkpoints is refused
    (a later --resume would continue the old run), or with `overwrite` moved aside to <name>.replaced-<time>,
    so nothing is lost. Only rank 0 acts."""
    directory = Path(directory)
    held = sorted(directory.glob("meta_*.json")) + sorted(directory.glob("model_*.pt")) if directory.is_dir() else []
    if rank != 0 or not held:
        return
    if not overwrite:
        raise CheckpointError(f"{directory} already holds a run ({len(held)} checkpoint files): continue it with --resume, "
                              "move it aside with --overwrite, or choose another --tag")
    aside = directory.with_name(f"{directory.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    directory.rename(aside)
    print(f"--overwrite: moved the previous run in {directory} to {aside}", flush=True)


def saved_train_config(meta: dict) -> dict:
    """The training flags a checkpoint was written with, in today's form (--compile was a bool: True meant "auto",
    compiling on CUDA only)."""
    saved = meta.get("train_config", {})
    if isinstance(saved.get("compile"), bool):
        saved = {**saved, "compile": "auto" if saved["compile"] else "off"}
    return saved


def config_changes(saved: dict, given: dict, free=(), defaults=None) -> list[str]:
    """'flag: saved -> given' for every field that differs between two training configs, except those in `free`;
    a field the saved config lacks (added to the code after that run started) counts as its value in `defaults`."""
    defaults = defaults or {}
    return [f"--{k}: {saved.get(k, defaults.get(k))!r} -> {v!r}" for k, v in given.items()
            if k not in free and saved.get(k, defaults.get(k)) != v]


def load_meta(directory, step: int) -> dict:
    path = Path(directory) / f"meta_{step:06d}.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint meta file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint meta file {path} is corrupt ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION or "model_config" not in meta:
        raise CheckpointError(f"{path} is not a checkpoint of this format (version {meta.get('format_version')}, "
                              f"expected {FORMAT_VERSION})")
    return meta


def load_module_states(directory, step: int, device="cpu") -> dict:
    states = _torch_load(Path(directory) / f"model_{step:06d}.pt", device)
    if not isinstance(states, dict) or "gpt" not in states:
        raise CheckpointError(f"{Path(directory) / f'model_{step:06d}.pt'} does not hold a GPT state dict")
    return states


def load_training_state(directory, step: int, rank: int, device="cpu") -> dict:
    """{'optimizers': [...], 'rng': {...}, 'rank_state': ...} saved by rank `rank`."""
    state = _torch_load(Path(directory) / f"optim_{step:06d}_rank{rank}.pt", device)
    if not isinstance(state, dict) or "optimizers" not in state:
        raise CheckpointError(f"optimizer file of step {step} rank {rank} in {directory} is not a training state")
    return state


def restore_rng(rng: dict):
    torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"].cpu())


def load_state_strict(module: torch.nn.Module, state: dict, what: str):
    """load_state_dict that turns key/shape mismatches into a CheckpointError naming `what`."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:4]
        raise CheckpointError(f"{what} does not match this model: {' '.join(first)}") from None


def build_model(directory, step: int | None, device, phase: str = "eval"):
    """Rebuild the GPT of a checkpoint. Returns (model, module_states, meta); other modules' states are left to the caller."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory {directory} does not exist (train a model first)")
    step = find_last_step(directory) if step is None else step
    meta = load_meta(directory, step)
    try:
        config = GPTConfig(**{**LEGACY_MODEL_CONFIG, **meta["model_config"]})
    except TypeError as e:
        raise CheckpointError(f"model config in {directory}/meta_{step:06d}.json is incompatible ({e})") from None
    states = load_module_states(directory, step, device)
    # built directly on the device: the first use of the meta device imports torch._refs (~4 s of startup)
    with torch.device(device):
        model = GPT(config)  # the rotary buffers are computed here; every weight comes from the checkpoint
    load_state_strict(model, states["gpt"], f"checkpoint {directory}/model_{step:06d}.pt")
    model.train(phase == "train")
    return model, states, meta


def model_meta(model: GPT, **extra) -> dict:
    return dict(model_config=asdict(model.config), **extra)


STAGE_SCRIPTS = {"base": "base_train", "mid": "mid_train", "sft": "chat_sft", "rl": "chat_rl"}  # the script that writes each stage


def load_model(stage: str, tag: str = "", step: int | None = None, device="cpu"):
    """The model of checkpoints/<stage>/<tag> (default tag: the most recent) for inference:
    (model, meta, directory). A missing checkpoint is a CheckpointError that says how to make one."""
    stage_dir = checkpoint_dir(stage, tag) if tag else get_base_dir() / "checkpoints" / stage
    try:
        directory = resolve_checkpoint_dir(stage, tag)
        step = find_last_step(directory) if step is None else step
    except CheckpointError:
        raise CheckpointError(f"no {stage} checkpoint found in {stage_dir}: run `bash run10.sh` first "
                              f"(or `python -m scripts.{STAGE_SCRIPTS.get(stage, stage)}`)") from None
    model, _, meta = build_model(directory, step, device)
    return model, meta, directory


def load_model_and_tokenizer(stage: str, tag: str = "", step: int | None = None, device="cpu"):
    """load_model plus the tokenizer it was trained with: (model, tokenizer, meta, directory).
    A missing tokenizer is a FileNotFoundError, a different one a CheckpointError."""
    model, meta, directory = load_model(stage, tag, step, device)
    tokenizer = get_tokenizer()
    if meta.get("tokenizer") != tokenizer.identity():
        raise CheckpointError(f"checkpoint {directory} was trained with a different tokenizer than the one in "
                              f"{get_base_dir() / 'tokenizer'}")
    return model, tokenizer, meta, directory
