"""Pretrain the base GPT.

    python -m scripts.base_train --depth=4 --max_seq_len=512            # one process (CPU or GPU)
    torchrun --nproc_per_node=8 -m scripts.base_train --depth=20       # 8 GPUs
    python -m scripts.base_train ... --mc --mc_wc_budget=128           # with MegaContext (mc/)

Every knob is a flag (see --help); its default lives in TrainConfig below. The horizon is either
--num_iterations or tokens = --target_param_data_ratio x parameters. Checkpoints go to
$MC_BASE_DIR/checkpoints/base/<tag> and --resume continues exactly where a run stopped.

With --mc every micro-batch goes through mc.runtime.MCController (tree, working contexts, LensNet,
allocator, one batched forward); the --mc_* flags map onto mc.config.MCConfig. The micro-batch
shrinks automatically so an MC forward sees no more entries than a plain one (mc.build).
"""

import argparse
import functools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from mc.build import build_controller, load_matching_nets, mc_meta, mc_micro_batch
from mc.config import LEGACY_MC_CONFIG, MCConfig, MCConfigError
from mc.telemetry import NoTelemetry, StepTelemetry
from nanochat import report, tracing
from nanochat.checkpoint import (CheckpointError, build_model, checkpoint_dir, claim_run_dir, config_changes, find_last_step,
                                 load_state_strict, load_training_state, model_meta, resolve_checkpoint_dir, restore_rng,
                                 save_checkpoint, saved_train_config)
from nanochat.common import (COMPILE_CHOICES, CPU_BF16_CHOICES, CPU_COMPILE_MIN_STEPS, autocast_ctx, autocast_dtype,
                             compute_cleanup, compute_init, get_report_dir, measure_matmul_flops, print0,
                             resumed_autocast_dtype, seed_everything, synchronize, use_compile)
from nanochat.configurator import FlagParser, add_dataclass_args, dataclass_from_args
from nanochat.dataloader import DataLoader
from nanochat.dataset import DataError, prepare
from nanochat.engine import Engine
from nanochat.gpt import GPT, SMEAR_MODES, GPTConfig
from nanochat.longrange import DataMixError, MixedLoader, parse_mix, target_weights, weighted_lm_loss
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import build_optimizers, lr_multiplier, optimizer_step, set_lr
from nanochat.progress import Progress
from nanochat.tokenizer import TokenizerError, get_tokenizer
from nanochat.tracking import run_link, start_run


class ConfigError(ValueError):
    """A flag value or combination that cannot work; the message names the flag."""


@dataclass
class TrainConfig:
    # data and model
    data: str = field(default="fineweb-edu", metadata={"help": "training data: fineweb-edu[:N shards], books, or a directory of .txt/.jsonl/.parquet"})
    text_column: str = field(default="text", metadata={"help": "with a directory --data: the .jsonl field / .parquet column holding the documents"})
    data_mix: str = field(default="", metadata={"help": "mix long-range synthetic rows into training, e.g. books:0.6,needle:0.2,recall:0.1,facts:0.1 "
                                                        "(natural text = the --data value or 'text'; see nanochat/longrange.py); empty = --data only"})
    warmup_mix: str = field(default="", metadata={"help": "a --data_mix spec for the first --warmup_mix_steps steps (a curriculum), e.g. copy:1 until the copy circuit forms"})
    warmup_mix_steps: int = field(default=0, metadata={"min": 0, "help": "steps that draw their rows from --warmup_mix"})
    pack_rows: float = field(default=0.0, metadata={"min": 0, "help": "share of --data_mix's long-range rows that hold 2-4 examples of random lengths back to back, so short histories stay in distribution"})
    depth: int = field(default=12, metadata={"min": 1, "help": "number of transformer layers; width = 64 * depth"})
    width: int = field(default=0, metadata={"min": 0, "help": "model width override (0 = 64 * depth)"})
    head_dim: int = field(default=64, metadata={"help": "attention head dimension", "choices": [64, 128]})
    max_seq_len: int = field(default=2048, metadata={"min": 2, "help": "tokens per training sequence"})
    smear: str = field(default=GPTConfig.smear, metadata={"help": "previous-token mixing in the GPT: smeared keys, embedding smear, both or none (see nanochat/gpt.py)", "choices": list(SMEAR_MODES)})
    smear_taps: int = field(default=GPTConfig.smear_taps, metadata={"min": 1, "help": "previous tokens the embedding smear mixes in"})
    layer_scalars: bool = field(default=GPTConfig.layer_scalars, metadata={"help": "per-layer learned residual scale and input-embedding share (see nanochat/gpt.py)"})
    backout: bool = field(default=GPTConfig.backout, metadata={"help": "the LM head reads the residual minus a learned share of the middle layer's input"})
    vocab_multiple: int = field(default=GPTConfig.vocab_multiple, metadata={"min": 1, "help": "pad the embedding and head to a multiple of this many rows (logits are cropped)"})
    value_embeds: bool = field(default=GPTConfig.value_embeds, metadata={"help": "alternate layers add a learned per-token embedding to their attention values (see nanochat/gpt.py)"})
    window_pattern: str = field(default=GPTConfig.window_pattern, metadata={"help": "attention window per layer, tiled: L = all earlier positions, S = the last max_seq_len/2 (e.g. SSSL; the last layer is always L)"})
    # horizon and batch
    num_iterations: int = field(default=-1, metadata={"min": -1, "help": "optimizer steps; -1 = derive from --target_param_data_ratio"})
    target_param_data_ratio: float = field(default=20.0, metadata={"min": 0, "help": "training tokens per parameter when --num_iterations=-1"})
    total_batch_size: int = field(default=524288, metadata={"min": 1, "help": "tokens per optimizer step, over all ranks and micro-batches"})
    device_batch_size: int = field(default=32, metadata={"min": 1, "help": "sequences per forward pass on each rank"})
    # optimization
    matrix_lr: float = field(default=0.02, metadata={"min": 0, "help": "Muon learning rate of the block matrices"})
    embedding_lr: float = field(default=0.2, metadata={"min": 0, "help": "AdamW learning rate of the token embedding (scaled by 1/sqrt(width/768))"})
    unembedding_lr: float = field(default=0.004, metadata={"min": 0, "help": "AdamW learning rate of the LM head (scaled by 1/sqrt(width/768))"})
    weight_decay: float = field(default=0.0, metadata={"min": 0, "help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.0, metadata={"min": 0, "help": "fraction of steps of linear LR warmup"})
    warmdown_ratio: float = field(default=0.2, metadata={"min": 0, "help": "fraction of final steps of linear LR decay"})
    final_lr_frac: float = field(default=0.0, metadata={"min": 0, "help": "LR at the end, as a fraction of the peak"})
    grad_clip: float = field(default=1.0, metadata={"min": 0, "help": "clip the global gradient norm (0 = off)"})
    answer_weight: float = field(default=1.0, metadata={"min": 0, "help": "loss weight of the answer tokens of --data_mix's long-range rows (natural text: 1)"})
    filler_weight: float = field(default=1.0, metadata={"min": 0, "help": "loss weight of the other tokens of those rows (their filler text); 0 = loss on the answers only"})
    history_lm_weight: float = field(default=0.0, metadata={"min": 0, "help": "with --mc: weight of an extra LM loss over every target of the history, in windows of W raw tokens (0 = off; see mc/runtime.py)"})
    # evaluation, sampling, checkpoints, logging
    eval_every: int = field(default=250, metadata={"min": 1, "help": "validate every N steps (and at the end)"})
    eval_tokens: int = field(default=10 * 524288, metadata={"min": 1, "help": "validation tokens per evaluation"})
    sample_every: int = field(default=2000, metadata={"min": -1, "help": "print samples every N steps (and at the end); -1 = only at the end"})
    save_every: int = field(default=-1, metadata={"min": -1, "help": "checkpoint every N steps (-1 = only at the end)"})
    log_every: int = field(default=10, metadata={"min": 1, "help": "print a log line every N steps"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint of --tag (every flag but the logging ones must match)"})
    overwrite: bool = field(default=False, metadata={"help": "a new run into a --tag that holds checkpoints moves them aside (to <tag>.replaced-<time>); without it such a run is refused"})
    init_from: str = field(default="", metadata={"help": "start the GPT from the last checkpoint of checkpoints/base/<this tag> (weights only: fresh optimizer and data order; --max_seq_len may differ), e.g. --mc training of a plain-pretrained model; GistNet and LensNet too when it was trained with the same --mc_* flags"})
    freeze: str = field(default="", metadata={"help": "modules kept fixed, a comma list of gpt, mc_gist, mc_lens; e.g. gpt,mc_gist trains only LensNet (a focus phase after --mc training, with --init_from)"})
    tag: str = field(default="", metadata={"help": "checkpoint directory name (default d<depth>)"})
    wandb_run: str = field(default="", metadata={"help": "wandb run name; empty = wandb off"})
    # runtime
    device_type: str = field(default="", metadata={"help": "cuda|mps|cpu (empty = autodetect)"})
    cpu_bf16: str = field(default="auto", metadata={"help": "bf16 autocast on CPU: auto = where this CPU's bf16 matmuls are faster than fp32", "choices": CPU_BF16_CHOICES})
    compile: str = field(default="auto", metadata={"help": f"torch.compile the GPT: auto = on CUDA, and on CPU for runs of >= {CPU_COMPILE_MIN_STEPS} steps", "choices": COMPILE_CHOICES})
    seed: int = field(default=42, metadata={"min": 0, "help": "seed of model init and data order"})
    mc: bool = field(default=False, metadata={"help": "train with MegaContext (see the --mc_* flags)"})


# flags that may differ on --resume (how it starts, what it logs); every other flag must match the saved run
RESUME_FREE = ("resume", "overwrite", "tag", "init_from", "eval_every", "eval_tokens", "sample_every", "save_every", "log_every",
               "wandb_run")


def validate(cfg: TrainConfig, world_size: int) -> int:
    """Check flag combinations; return the number of gradient-accumulation steps."""
    width = cfg.width or 64 * cfg.depth
    if cfg.depth < 1:
        raise ConfigError(f"--depth must be >= 1, got {cfg.depth}")
    if width % cfg.head_dim:
        raise ConfigError(f"--width={width} is not a multiple of --head_dim={cfg.head_dim}")
    if cfg.max_seq_len < 2:
        raise ConfigError(f"--max_seq_len must be >= 2, got {cfg.max_seq_len}")
    if not cfg.window_pattern or set(cfg.window_pattern) - set("SL"):
        raise ConfigError(f"--window_pattern={cfg.window_pattern!r}: use the letters S (short) and L (long), e.g. SSSL")
    tokens_per_fwd = cfg.device_batch_size * cfg.max_seq_len * world_size
    if cfg.device_batch_size < 1 or cfg.total_batch_size % tokens_per_fwd:
        raise ConfigError(f"--total_batch_size={cfg.total_batch_size} must be a positive multiple of "
                          f"--device_batch_size x --max_seq_len x ranks = {tokens_per_fwd}")
    if cfg.num_iterations == 0 or (cfg.num_iterations < 0 and cfg.target_param_data_ratio <= 0):
        raise ConfigError("set --num_iterations > 0 or --target_param_data_ratio > 0")
    if not 0 <= cfg.warmup_ratio + cfg.warmdown_ratio <= 1:
        raise ConfigError("--warmup_ratio + --warmdown_ratio must lie in [0, 1]")
    if cfg.eval_tokens < cfg.device_batch_size * cfg.max_seq_len * world_size:
        raise ConfigError(f"--eval_tokens={cfg.eval_tokens} is less than one validation batch ({tokens_per_fwd} tokens)")
    if cfg.data_mix:
        parse_mix(cfg.data_mix, cfg.data)  # raises DataMixError naming --data_mix
    if cfg.warmup_mix:
        if not cfg.data_mix:
            raise ConfigError("--warmup_mix needs a --data_mix to continue with")
        parse_mix(cfg.warmup_mix, cfg.data, "--warmup_mix")
    if cfg.warmup_mix_steps < 0 or bool(cfg.warmup_mix) != (cfg.warmup_mix_steps > 0):
        raise ConfigError("give --warmup_mix and --warmup_mix_steps > 0 together (or neither)")
    if not 0 <= cfg.pack_rows <= 1 or (cfg.pack_rows > 0 and not cfg.data_mix):
        raise ConfigError(f"--pack_rows={cfg.pack_rows}: must lie in [0, 1], and > 0 only with --data_mix")
    if not (cfg.answer_weight > 0 and cfg.filler_weight >= 0):
        raise ConfigError(f"--answer_weight must be > 0 and --filler_weight >= 0, got {cfg.answer_weight} and {cfg.filler_weight}")
    if cfg.history_lm_weight < 0 or (cfg.history_lm_weight > 0 and not cfg.mc):
        raise ConfigError(f"--history_lm_weight={cfg.history_lm_weight}: must be >= 0, and > 0 only with --mc")
    frozen = [name for name in cfg.freeze.split(",") if name]
    modules = ["gpt", *(["mc_gist", "mc_lens"] if cfg.mc else [])]
    if any(name not in modules for name in frozen):
        raise ConfigError(f"--freeze={cfg.freeze}: can freeze only {', '.join(modules)}" + ("" if cfg.mc else " (mc_* need --mc)"))
    if set(modules) <= set(frozen):
        raise ConfigError(f"--freeze={cfg.freeze} leaves nothing to train")
    if cfg.history_lm_weight > 0 and "gpt" in frozen:
        raise ConfigError(f"--history_lm_weight={cfg.history_lm_weight} trains only the GPT, which --freeze={cfg.freeze} keeps fixed")
    if cfg.init_from and cfg.resume:
        raise ConfigError("--init_from starts a new run and --resume continues one: give one of them")
    if cfg.overwrite and cfg.resume:
        raise ConfigError("--overwrite starts a new run and --resume continues one: give one of them")
    return cfg.total_batch_size // tokens_per_fwd


def muon_momentum(step: int) -> float:
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def parse_args(argv=None) -> tuple[TrainConfig, MCConfig | None]:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, TrainConfig, title="training")
    add_dataclass_args(parser, MCConfig, prefix="mc_", title="MegaContext (with --mc)")
    args = parser.parse_args(argv)
    cfg = dataclass_from_args(TrainConfig, args)
    argv = sys.argv[1:] if argv is None else argv
    if not cfg.mc and any(a.startswith("--mc_") for a in argv):
        parser.error("--mc_* flags were given without --mc")
    return cfg, dataclass_from_args(MCConfig, args, prefix="mc_") if cfg.mc else None


def train(cfg: TrainConfig, mc_cfg: MCConfig | None = None):
    ddp, rank, local_rank, world_size, device = compute_init(cfg.device_type)
    master = rank == 0
    grad_accum = validate(cfg, world_size)
    if mc_cfg:
        mc_cfg.validate(cfg.max_seq_len, cfg.head_dim)  # before any data or model work
    mc_config = asdict(mc_cfg) if mc_cfg else None
    amp_dtype = autocast_dtype(device.type, cfg.cpu_bf16)
    amp = autocast_ctx(device.type, amp_dtype)
    tag = cfg.tag or f"d{cfg.depth}"
    ckpt_dir = checkpoint_dir("base", tag)
    if not cfg.resume:
        claim_run_dir(ckpt_dir, cfg.overwrite, rank)

    tokenizer = get_tokenizer()
    token_bytes = tokenizer.token_bytes(device)
    data_dir = prepare(cfg.data, cfg.text_column) if master else None
    if ddp:
        torch.distributed.barrier()
        data_dir = prepare(cfg.data, cfg.text_column)

    # model, optimizers, and (on --resume) their saved states
    seed_everything(cfg.seed)
    model_config = GPTConfig(sequence_len=cfg.max_seq_len, vocab_size=tokenizer.vocab_size, n_layer=cfg.depth,
                             n_embd=cfg.width or 64 * cfg.depth, head_dim=cfg.head_dim, smear=cfg.smear,
                             smear_taps=cfg.smear_taps, layer_scalars=cfg.layer_scalars, backout=cfg.backout,
                             vocab_multiple=cfg.vocab_multiple, window_pattern=cfg.window_pattern,
                             value_embeds=cfg.value_embeds)
    model = GPT(model_config).to(device)
    model.init_weights()
    num_params = model.num_params()
    if cfg.num_iterations > 0:
        num_iterations = cfg.num_iterations
    else:
        num_iterations = max(1, round(cfg.target_param_data_ratio * num_params / cfg.total_batch_size))
    compiled = use_compile(device.type, cfg.compile, num_iterations)
    train_model = torch.compile(model, dynamic=False) if compiled else model
    flops_per_token = model.estimate_flops()
    # the micro-step, loss, metrics = step_fn(x, y, index, answers=, weights=), and what the step's log and trace count
    def step_fn(x, y, index, answers=None, weights=None):
        loss = weighted_lm_loss(train_model, x, y, weights)
        return loss, {"lm_loss": loss.detach()}
    controller, mc_modules, batch_size = None, {}, cfg.device_batch_size
    telemetry, entries_per_row, micro_batch_attributes = NoTelemetry(), cfg.max_seq_len, {}
    step_flops_per_token = flops_per_token
    if mc_cfg:
        # MegaContext: GistNet and LensNet (built right after the GPT, in the seeded init order); fewer sequences per
        # micro-batch, more micro-batches (same data per step, same memory); the controller's micro-step (tree,
        # working contexts, LensNet, one batched forward over (1+N) WCs of W entries per history) with its phase
        # timings; MFU counts the GPT's work: attention over W entries, the history LM's windows too, only the
        # forward pass when the GPT is frozen, and of that only the last H entries' share when GistNet is frozen too
        # (a focus phase: MCController.process_batch)
        controller = build_controller(model, mc_cfg, rank)
        mc_modules = controller.modules()
        batch_size = mc_micro_batch(cfg.device_batch_size, cfg.max_seq_len, mc_cfg)
        grad_accum *= cfg.device_batch_size // batch_size
        step_fn = functools.partial(controller.process_batch, forward_fn=train_model, history_lm_weight=cfg.history_lm_weight)
        telemetry = StepTelemetry(controller.timer)
        W = mc_cfg.wc_budget
        entries_per_row = (1 + mc_cfg.num_variants) * W
        micro_batch_attributes = {"variants": 1 + mc_cfg.num_variants, "wc_budget": W}
        history_entries = cfg.max_seq_len // W * W if cfg.history_lm_weight > 0 else 0
        # the history LM's last window is the truncation baseline, which then is not run as a working context
        gpt_entries_per_row = entries_per_row + history_entries - (W if history_entries else 0)
        frozen = set(cfg.freeze.split(","))
        passes = 1 / 3 if "gpt" in frozen else 1
        passes *= model.kept_forward_share(W, mc_cfg.horizon) if {"gpt", "mc_gist"} <= frozen else 1
        step_flops_per_token = model.estimate_flops(context_len=W) * passes * gpt_entries_per_row / cfg.max_seq_len
        print0(f"MegaContext: {controller.gistnet.summary()}; {controller.lensnet.summary()}")
        print0(f"MegaContext: micro-batch {batch_size} sequences x {1 + mc_cfg.num_variants} variants "
               f"= {batch_size * (1 + mc_cfg.num_variants)} working contexts of W={W} "
               f"(plain: {cfg.device_batch_size} x {cfg.max_seq_len})")
    for name in filter(None, cfg.freeze.split(",")):
        {"gpt": model, **mc_modules}[name].requires_grad_(False)  # no gradients, not in the optimizers
    muon_nets, adam_nets = controller.optimizer_split() if controller else ([], [])
    optimizers = build_optimizers(model, muon_nets, adam_nets, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                                  unembedding_lr=cfg.unembedding_lr, weight_decay=cfg.weight_decay, ns_dtype=amp_dtype)
    start_step, loader_state, history = 0, None, {"step": [], "loss": [], "val_step": [], "val_bpb": []}
    if cfg.init_from:
        init_dir = resolve_checkpoint_dir("base", cfg.init_from)
        _, states, meta = build_model(init_dir, None, "cpu")
        ours = {k: v for k, v in asdict(model_config).items() if k != "sequence_len"}
        if {k: v for k, v in meta["model_config"].items() if k != "sequence_len"} != ours:
            raise ConfigError(f"--init_from={cfg.init_from}: the checkpoint in {init_dir} has model config "
                              f"{meta['model_config']}, but the flags give {asdict(model_config)} (only --max_seq_len may differ)")
        if meta.get("tokenizer") != tokenizer.identity():
            raise ConfigError(f"--init_from={cfg.init_from}: {init_dir} was trained with a different tokenizer")
        load_state_strict(model, states["gpt"], f"--init_from={cfg.init_from} ({init_dir})")
        print0(f"initialised the GPT from {init_dir} step {meta['step']}")
        if controller and meta.get("mc_config"):
            print0(load_matching_nets(controller, states, meta, f"--init_from={cfg.init_from} ({init_dir})"))
    if cfg.resume:
        start_step = find_last_step(ckpt_dir)
        _, states, meta = build_model(ckpt_dir, start_step, device, phase="train")
        if meta["model_config"] != asdict(model_config):
            raise ConfigError(f"--resume: the checkpoint in {ckpt_dir} has model config {meta['model_config']}, "
                              f"but the flags give {asdict(model_config)}")
        saved_mc = {**LEGACY_MC_CONFIG, **meta["mc_config"]} if meta.get("mc_config") else None
        if saved_mc != mc_config:
            raise ConfigError(f"--resume: the checkpoint in {ckpt_dir} was trained with MegaContext config "
                              f"{meta.get('mc_config')}, but the flags give {mc_config}")
        if changes := config_changes(saved_train_config(meta), asdict(cfg), RESUME_FREE, asdict(TrainConfig())):
            raise ConfigError(f"--resume: the run in {ckpt_dir} was trained with other flags (saved -> given): "
                              f"{'; '.join(changes)}")
        for name, module in {"gpt": model, **mc_modules}.items():
            load_state_strict(module, states[name], f"{ckpt_dir}/model_{start_step:06d}.pt ({name})")
        amp_dtype = resumed_autocast_dtype(amp_dtype, cfg.cpu_bf16, meta.get("autocast"))
        amp = autocast_ctx(device.type, amp_dtype)
        for opt in optimizers[1:]:
            opt.ns_dtype = amp_dtype  # Muon's, as in the first run
        training_state = load_training_state(ckpt_dir, start_step, rank, device)
        for opt, state in zip(optimizers, training_state["optimizers"]):
            opt.load_state_dict(state)
        restore_rng(training_state["rng"])
        loader_state, history = training_state["rank_state"]["loader"], meta["history"]
        print0(f"resumed from {ckpt_dir} at step {start_step}")
    params = [p for module in (model, *mc_modules.values()) for p in module.parameters()]
    peak_flops, peak_remeasures = measure_matmul_flops(device, amp_dtype) * world_size, 0
    print0(f"model: {num_params:,} parameters, {flops_per_token:.3g} FLOPs/token, config {asdict(model_config)}")
    print0(f"training: {num_iterations} steps x {cfg.total_batch_size:,} tokens "
           f"({grad_accum} micro-batches of {batch_size} x {cfg.max_seq_len} on {world_size} rank(s)), "
           f"device {device}, autocast {amp_dtype}, compile {'on' if compiled else 'off'}")

    if cfg.data_mix:
        loader = MixedLoader(tokenizer, batch_size, cfg.max_seq_len, data_dir, parse_mix(cfg.data_mix, cfg.data),
                             seed=cfg.seed, rank=rank, world_size=world_size, device=device,
                             block_size=(mc_cfg or MCConfig()).block_size,
                             warmup_mix=parse_mix(cfg.warmup_mix, cfg.data, "--warmup_mix") if cfg.warmup_mix else None,
                             warmup_rows=cfg.warmup_mix_steps * batch_size * grad_accum, pack=cfg.pack_rows)
    else:
        loader = DataLoader(tokenizer, batch_size, cfg.max_seq_len, data_dir, split="train", seed=cfg.seed,
                            rank=rank, world_size=world_size, device=device)
    if loader_state is not None:
        loader.load_state_dict(loader_state)
    batches = iter(loader)
    eval_steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * world_size))
    engine = Engine(model, autocast=lambda: autocast_ctx(device.type, amp_dtype))
    wandb_run = start_run(cfg.wandb_run, "base_train", {"train": asdict(cfg), "model": asdict(model_config),
                                                         "mc": mc_config}, master)

    def validation_bpb():
        val_loader = DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, data_dir, split="val",
                                rank=rank, world_size=world_size, device=device)
        model.eval()
        bpb = evaluate_bpb(train_model, iter(val_loader), eval_steps, token_bytes, amp)
        arms = {}
        if controller:
            mc_loader = DataLoader(tokenizer, batch_size, cfg.max_seq_len, data_dir, split="val", rank=rank,
                                   world_size=world_size, device=device)
            mc_steps = max(1, eval_steps * cfg.device_batch_size // batch_size)
            arms = controller.arms_bpb(iter(mc_loader), mc_steps, token_bytes, amp)
        model.train()
        return bpb, arms

    def samples():
        prompts = ["The capital of France is", "It is a truth universally acknowledged, that", "Once upon a time"]
        model.eval()
        texts = []
        for prompt in prompts:
            ids = tokenizer.encode(prompt, prepend=tokenizer.bos_token_id)
            row = engine.generate_batch(ids, max_tokens=32, temperature=0.0)[0]
            texts.append(tokenizer.decode(row[1:]))
        model.train()
        return texts

    def save(step: int, val_bpb: float):
        meta = model_meta(model, train_config=asdict(cfg), history=history, val_bpb=val_bpb, autocast=str(amp_dtype),
                          tokenizer=tokenizer.identity(), **(mc_meta(mc_cfg) if mc_cfg else {}))
        save_checkpoint(ckpt_dir, step, {"gpt": model, **mc_modules}, optimizers, meta, rank,
                        {"loader": loader.state_dict()})

    val_bpb, arms, sample_texts = float("nan"), {}, []
    train_time, smooth_loss, tokens_per_sec, mfu = 0.0, 0.0, 0.0, 0.0
    progress = Progress(num_iterations, start_step, "base_train", enabled=master)
    step = start_step
    while True:
        last = step == num_iterations
        # one trace per step: validation, sampling and saving when due, then the micro-batches and the update
        with tracing.span("train.step", step=step, rank=rank, micro_batches=grad_accum, tokens=cfg.total_batch_size):
            if last or (cfg.eval_every > 0 and step % cfg.eval_every == 0 and step > start_step) or step == 0:
                with tracing.span("validation", step=step):
                    val_bpb, arms = validation_bpb()
                history["val_step"].append(step)
                history["val_bpb"].append(val_bpb)
                for arm, value in arms.items():
                    history.setdefault(f"val_{arm}", []).append(value)
                arm_text = "".join(f" | {arm} {value:.4f}" for arm, value in arms.items())
                progress.log(f"val bpb {val_bpb:.4f}" + (f" | last-H bpb:{arm_text}" if arms else ""))
                wandb_run.log({"step": step, "val/bpb": val_bpb, **{f"val/h_bpb_{a}": v for a, v in arms.items()}})
            if master and (last or (cfg.sample_every > 0 and step % cfg.sample_every == 0 and step > start_step)):
                sample_texts = samples()
                for text in sample_texts:
                    progress.write(f"  sample: {text!r}")
            if last or (cfg.save_every > 0 and step % cfg.save_every == 0 and step > start_step):
                with tracing.span("checkpoint", step=step):
                    save(step, val_bpb)
            if last:
                break

            synchronize(device)
            t0 = time.perf_counter()
            lrm = lr_multiplier(step, num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
            set_lr(optimizers, lrm, muon_momentum(step))
            loss_sum = torch.zeros((), device=device)
            telemetry.reset()
            for micro in range(grad_accum):
                x, y, *answers = next(batches)  # a --data_mix loader also marks the answer targets
                answers = answers[0] if answers else None
                weights = target_weights(answers, cfg.answer_weight, cfg.filler_weight) if answers is not None else None
                with tracing.span("micro_batch", index=micro, sequences=x.size(0), entries=x.size(0) * entries_per_row,
                                  **micro_batch_attributes):
                    with amp:
                        loss, metrics = step_fn(x, y, step * grad_accum + micro, answers=answers, weights=weights)
                    with telemetry.phase("backward"):
                        (loss / grad_accum).backward()
                loss_sum += metrics["lm_loss"]
                telemetry.add(metrics, grad_accum)
            with tracing.span("optimizer", step=step), telemetry.phase("optimizer"):
                optimizer_step(optimizers, params, cfg.grad_clip)
                train_loss = (loss_sum / grad_accum).item()
                synchronize(device)
            telemetry.collect()
            dt = time.perf_counter() - t0

        step += 1
        if not math.isfinite(train_loss):
            raise RuntimeError(f"training loss became {train_loss} at step {step}; lower the learning rates")
        if step > start_step + 1:  # the first step includes warm-up/compilation
            train_time += dt
        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased = smooth_loss / (1 - 0.9 ** (step - start_step))
        tokens_per_sec = cfg.total_batch_size / dt
        mfu = 100 * step_flops_per_token * tokens_per_sec / peak_flops
        if mfu > 100 and peak_remeasures < 3:  # the start-up peak was measured beside another process: measure again
            peak_remeasures += 1
            peak_flops = max(peak_flops, measure_matmul_flops(device, amp_dtype) * world_size)
            mfu = 100 * step_flops_per_token * tokens_per_sec / peak_flops
        history["step"].append(step)
        history["loss"].append(train_loss)
        progress.update(loss=f"{debiased:.3f}", tok_s=f"{tokens_per_sec:,.0f}", mfu=f"{mfu:.1f}%")
        if step % cfg.log_every == 0:
            progress.log(f"loss {debiased:.4f} | lr x{lrm:.2f} | {dt * 1000:.0f} ms | {tokens_per_sec:,.0f} tok/s | "
                         f"mfu {mfu:.1f}%")
            if mc_line := telemetry.log_line(dt):
                progress.write(mc_line)
        wandb_run.log({"step": step, "train/loss": train_loss, "train/tok_per_s": tokens_per_sec, "train/mfu_percent": mfu,
                       "train/lrm": lrm, "train/step_ms": dt * 1000, **telemetry.wandb()})
    progress.close()

    if master:
        steps_timed = max(1, step - start_step - 1)
        mean_tok_s = cfg.total_batch_size * steps_timed / train_time if train_time > 0 else float("nan")  # nan: one step
        mean_mfu = 100 * step_flops_per_token * mean_tok_s / peak_flops
        report_dir = get_report_dir()
        # an --mc run has its own section and plots, so a recipe can report it next to a plain run
        name, title = ("base_mc", " with MegaContext") if controller else ("base", "")
        report.plot_curves(report_dir / f"{name}_loss.png", {"train loss (nats/token)": (history["step"], history["loss"])},
                           "step", "loss", f"Base training loss{title}")
        val_series = {"val bpb": (history["val_step"], history["val_bpb"])}
        val_series.update({f"last-H bpb, {arm}": (history["val_step"], history[f"val_{arm}"]) for arm in arms})
        report.plot_curves(report_dir / f"{name}_val_bpb.png", val_series, "step", "bits per byte",
                           f"Base validation bits per byte{title}")
        report.log_section(name.replace("_", "-") + "-train", f"Base model training{title}", [
            {"data": cfg.data + (f" (mix {cfg.data_mix})" if cfg.data_mix else ""), "parameters": f"{num_params:,}", "FLOPs per token": f"{flops_per_token:.3g}",
             "steps": num_iterations, "tokens per step": cfg.total_batch_size, "micro-batches": grad_accum,
             "ranks": world_size, "device": str(device), "autocast": str(amp_dtype)},
            {"initial val bpb": history["val_bpb"][0], "final val bpb": val_bpb,
             "training time": f"{train_time / 60:.2f} min", "tokens/s (mean)": f"{mean_tok_s:,.0f}",
             "MFU (mean)": f"{mean_mfu:.2f}%", "checkpoint": str(ckpt_dir),
             **({"wandb run": run_link(wandb_run)} if run_link(wandb_run) else {})},
            *([{f"final last-H bpb ({arm}, W={mc_cfg.wc_budget})": v for arm, v in arms.items()},
               "MegaContext config: `" + json.dumps(asdict(mc_cfg)) + "`"] if controller else []),
            ("img", f"{name}_loss.png"), ("img", f"{name}_val_bpb.png"),
            "Samples (greedy):", *[f"    {t!r}" for t in sample_texts],
            "Config: `" + json.dumps(asdict(cfg)) + "`",
        ])
        print0(f"done: val bpb {val_bpb:.4f}, checkpoint in {ckpt_dir}")
    wandb_run.finish()
    tracing.shutdown()
    compute_cleanup()
    return val_bpb


def main(argv=None):
    cfg, mc_cfg = parse_args(argv)
    try:
        train(cfg, mc_cfg)
    except (ConfigError, MCConfigError, CheckpointError, DataError, DataMixError, TokenizerError, FileNotFoundError) as e:
        compute_cleanup()
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
