"""Build MegaContext for a GPT: the nets (in the right dtype and device), the controller, and the
micro-batch size that keeps an MC step within the memory of the plain step.

Checkpoints store the nets as the modules "mc_gist" and "mc_lens" next to "gpt", and the MCConfig
as meta["mc_config"], so every later stage (eval, chat) rebuilds exactly what was trained.
"""

from dataclasses import asdict

import torch

from mc.config import LEGACY_MC_CONFIG, MCConfig, MCConfigError
from mc.gistnet import GistNet
from mc.lensnet import LensNet
from mc.runtime import MCController
from nanochat.checkpoint import CheckpointError, load_model_and_tokenizer, load_module_states, load_state_strict

AUX_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_controller(model, cfg: MCConfig, rank: int = 0) -> MCController:
    """Fresh GistNet + LensNet on the model's device; dtype = the model's unless --mc_aux_dtype says otherwise."""
    cfg.validate(model.config.sequence_len, model.config.head_dim)
    weight = model.lm_head.weight
    dtype = weight.dtype if cfg.aux_dtype == "auto" else AUX_DTYPES[cfg.aux_dtype]
    d_model = model.config.n_embd
    gistnet = GistNet(cfg, d_model, model.config.vocab_size).to(device=weight.device, dtype=dtype)
    lensnet = LensNet(cfg, d_model).to(device=weight.device, dtype=dtype)
    return MCController(model, gistnet, lensnet, cfg, rank)


def load_controller(model, states: dict, meta: dict, rank: int = 0) -> MCController:
    """The controller of a checkpoint trained with --mc (module states from checkpoint.load_module_states)."""
    if "mc_config" not in meta or "mc_gist" not in states:
        raise CheckpointError("this checkpoint was trained without --mc: it has no GistNet/LensNet to load")
    try:
        cfg = MCConfig(**{**LEGACY_MC_CONFIG, **meta["mc_config"]})
    except TypeError as e:
        raise CheckpointError(f"the checkpoint's MegaContext config is incompatible ({e})") from None
    controller = build_controller(model, cfg, rank)
    load_state_strict(controller.gistnet, states["mc_gist"], "the checkpoint's GistNet")
    load_state_strict(controller.lensnet, states["mc_lens"], "the checkpoint's LensNet")
    return controller


def load_matching_nets(controller: MCController, states: dict, meta: dict, source: str) -> str:
    """Load GistNet and LensNet from another MC checkpoint's states when these flags build the same nets (a warm
    start, e.g. --init_from); otherwise they stay fresh. Returns the line saying which happened."""
    saved = MCConfig(**{**LEGACY_MC_CONFIG, **meta["mc_config"]}).net_fields()
    ours = controller.cfg.net_fields()
    differ = sorted(k for k, v in ours.items() if saved.get(k) != v)
    if differ == ["lens_match"] and ours["lens_match"]:  # a trained LensNet gains the question match, which starts fresh
        load_state_strict(controller.gistnet, states["mc_gist"], f"{source}, mc_gist")
        fresh = {k: v for k, v in controller.lensnet.state_dict().items() if k.startswith("match_")}
        load_state_strict(controller.lensnet, {**states["mc_lens"], **fresh}, f"{source}, mc_lens")
        return f"initialised GistNet and LensNet from {source} too; LensNet's question match (--mc_lens_match) starts fresh"
    if differ:
        return f"GistNet and LensNet start fresh: {source} built them with other --mc_* settings ({', '.join(differ)})"
    for name, module in controller.modules().items():
        load_state_strict(module, states[name], f"{source}, {name}")
    return f"initialised GistNet and LensNet from {source} too"


def load_mc_model(stage: str, tag: str = "", step: int | None = None, device="cpu"):
    """(model, controller, tokenizer, meta, directory) of a checkpoint with MegaContext nets (trained with
    --mc, or fine-tuned from one by mid/SFT, which carry the nets along); CheckpointError otherwise."""
    model, tokenizer, meta, directory = load_model_and_tokenizer(stage, tag, step, device)
    if "mc_config" not in meta:
        raise CheckpointError(f"checkpoint {directory} has no MegaContext nets (it was not trained with --mc): "
                              "train one with `bash run10.sh --mc`, or chat without --mc")
    return model, load_controller(model, load_module_states(directory, meta["step"], device), meta), tokenizer, meta, directory


def mc_meta(cfg: MCConfig) -> dict:
    return {"mc_config": asdict(cfg)}


def mc_micro_batch(device_batch_size: int, seq_len: int, cfg: MCConfig) -> int:
    """Sequences per MC micro-batch: the largest divisor b of device_batch_size with b (1+N) W <= B T,
    i.e. the MC forward sees no more entries than the plain one (so it fits the same memory)."""
    per_sequence = (1 + cfg.num_variants) * cfg.wc_budget
    fitting = [b for b in range(1, device_batch_size + 1) if device_batch_size % b == 0 and b * per_sequence <= device_batch_size * seq_len]
    if not fitting:
        raise MCConfigError(f"one sequence needs {(1 + cfg.num_variants)} x {cfg.wc_budget} working-context entries, more than "
                            f"the plain micro-batch of --device_batch_size={device_batch_size} x --max_seq_len={seq_len}; "
                            "lower --mc_num_variants or --mc_wc_budget, or raise --device_batch_size")
    return max(fitting)
