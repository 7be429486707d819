"""Fine-tuning on conversations: what mid-training (scripts/mid_train.py) and SFT (scripts/chat_sft.py) share.

- `ChatBatcher`: conversations -> (x, y) batches. Targets are the next token where the render mask
  (tokenizer.render_conversation) is 1, i.e. assistant content and <|assistant_end|>, else -1.
    packed (mid): rows of exactly T+1 tokens, each starting at a conversation's BOS. Whole
      conversations are packed best-fit from a look-ahead window of waiting ones; the end of a row
      that no waiting conversation fits is padding (x = BOS, target -1). No conversation is cut.
    padded (SFT): one conversation per row, right-padded (target -1) to the longest row of the batch.
  A conversation longer than T+1 tokens is dropped and counted, never truncated: in long-document QA
  the question and answer come last. Epoch e visits the conversations in an order shuffled from
  (seed, e); rank r of W takes every W-th. The whole state (epoch, cursor, window, dropped) is small
  and exact: `load_state_dict(state_dict())` continues with the same next batch.
- `fit_longdoc`: longdoc_qa documents sized (by measurement) to fill ~85% of the model's context on average.
- `evaluate_loss`: validation loss in nats per target token (and at the end, nanochat.loss_eval's bits per byte).
- `train_chat`: the procedure of both scripts: source checkpoint -> data -> loop -> checkpoints in
  checkpoints/<stage>/<tag> (resumable) -> report section; a MegaContext checkpoint's nets are carried along, or
  with --mc_memory_rows trained on memory rows beside the conversations (the scripts pass in mc/rehearsal.py).
"""

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.distributed as dist

from nanochat import report, tracing
from nanochat.chat_data import load_conversations
from nanochat.checkpoint import (CheckpointError, build_model, checkpoint_dir, claim_run_dir, config_changes, find_last_step,
                                 load_training_state, model_meta, resolve_checkpoint_dir, restore_rng, save_checkpoint,
                                 saved_train_config)
from nanochat.common import (COMPILE_CHOICES, CPU_BF16_CHOICES, CPU_COMPILE_MIN_STEPS, autocast_ctx, autocast_dtype,
                             compute_cleanup, compute_init, get_report_dir, print0, resumed_autocast_dtype, synchronize,
                             use_compile)
from nanochat.dataset import DataError, filler_paragraphs, prepare
from nanochat.longdoc_qa import LongDocQAConfig, longdoc_qa
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import build_optimizers, lr_multiplier, optimizer_step, set_lr
from nanochat.progress import Progress
from nanochat.tokenizer import TokenizerError, get_tokenizer
from nanochat.tracking import run_link, start_run


class ConfigError(ValueError):
    """A flag value or combination that cannot work; the message names the flag."""


# -----------------------------------------------------------------------------
# batches of conversations

class ChatBatcher:
    """(x, y) batches [B, T] (packed) or [B, t <= T] (padded) of conversations for one rank; resumable."""

    def __init__(self, tokenizer, conversations: list[dict], batch_size: int, seq_len: int, pack: bool,
                 seed: int = 0, rank: int = 0, world_size: int = 1, device="cpu", window: int = 64,
                 single_pass: bool = False):
        if len(conversations) < world_size:
            raise ValueError(f"{len(conversations)} conversations cannot be shared by {world_size} ranks")
        self.tokenizer, self.conversations = tokenizer, conversations
        self.bos = tokenizer.bos_token_id
        self.batch_size, self.row_len, self.pack = batch_size, seq_len + 1, pack
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.window = window if pack else 1  # padded rows take conversations strictly in order
        self.single_pass = single_pass  # stop after one epoch (validation) instead of cycling forever
        self.epoch, self.cursor, self.pending, self.visited, self.dropped = 0, 0, [], 0, 0
        self._rendered = {}  # index -> (ids, mask) int64 arrays, only for the conversations in the window
        self._order = (-1, [])  # (epoch, the order of the conversations in that epoch)
        self.real_tokens = self.total_tokens = 0  # non-padding / all tokens of the batches so far (not saved)

    def _next_index(self) -> int | None:
        """The next conversation index of this rank, or None at the end of a single pass."""
        while True:
            pos = self.rank + self.cursor * self.world_size
            if pos < len(self.conversations):
                if self._order[0] != self.epoch:
                    rng = random.Random(f"chat_batcher/{self.seed}/{self.epoch}")
                    self._order = (self.epoch, rng.sample(range(len(self.conversations)), len(self.conversations)))
                self.cursor += 1
                return self._order[1][pos]
            if self.single_pass:
                return None
            self.epoch, self.cursor = self.epoch + 1, 0

    def _render(self, index: int):
        if index not in self._rendered:
            ids, mask = self.tokenizer.render_conversation(self.conversations[index])
            self._rendered[index] = (np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int64))
        return self._rendered[index]

    def _fill_window(self):
        streak = 0  # conversations dropped in a row: a whole epoch of them means none fits at all
        while len(self.pending) < self.window:
            index = self._next_index()
            if index is None:
                return
            self.visited += 1
            if len(self._render(index)[0]) > self.row_len:
                del self._rendered[index]
                self.dropped += 1
                streak += 1
                if streak >= len(self.conversations):
                    raise DataError(f"no conversation fits the model's context of {self.row_len - 1} tokens")
                continue
            self.pending.append(index)
            streak = 0

    def _next_row(self):
        """(ids, mask) of the next row, or None when a single pass is exhausted. Padding has mask 0."""
        self._fill_window()
        if not self.pending:
            return None
        L = self.row_len if self.pack else len(self._render(self.pending[0])[0])
        ids, mask = np.full(L, self.bos, dtype=np.int64), np.zeros(L, dtype=np.int64)
        filled = 0
        while self.pending:
            space = L - filled
            lengths = [len(self._render(i)[0]) for i in self.pending]
            fits = [k for k, n in enumerate(lengths) if n <= space]
            if not fits:
                break
            k = max(fits, key=lambda k: lengths[k])  # best fit: the longest waiting conversation that fits
            index = self.pending.pop(k)
            conv_ids, conv_mask = self._rendered.pop(index)
            ids[filled:filled + len(conv_ids)], mask[filled:filled + len(conv_ids)] = conv_ids, conv_mask
            filled += len(conv_ids)
            if not self.pack:
                break
            self._fill_window()
        self.real_tokens += filled
        return ids, mask

    def __iter__(self):
        return self

    def __next__(self):
        rows = []
        while len(rows) < self.batch_size and (row := self._next_row()) is not None:
            rows.append(row)
        if not rows:
            raise StopIteration
        width = max(len(ids) for ids, _ in rows) if not self.pack else self.row_len
        ids = np.full((len(rows), width), self.bos, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for b, (row_ids, row_mask) in enumerate(rows):
            ids[b, :len(row_ids)], mask[b, :len(row_mask)] = row_ids, row_mask
        self.total_tokens += ids.size
        x = torch.from_numpy(ids[:, :-1].copy())  # [B, t]
        y = torch.from_numpy(np.where(mask[:, 1:] == 1, ids[:, 1:], -1))  # [B, t]
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "n": len(self.conversations),
                "epoch": self.epoch, "cursor": self.cursor, "pending": list(self.pending), "visited": self.visited,
                "dropped": self.dropped}

    def load_state_dict(self, state: dict):
        for key, mine in (("seed", self.seed), ("rank", self.rank), ("world_size", self.world_size),
                          ("n", len(self.conversations))):
            if state[key] != mine:
                raise ValueError(f"batcher state was saved with {key}={state[key]!r}, this batcher has {key}={mine!r}")
        self.epoch, self.cursor, self.visited, self.dropped = state["epoch"], state["cursor"], state["visited"], state["dropped"]
        self.pending, self._rendered = list(state["pending"]), {}
        return self


# -----------------------------------------------------------------------------
# long-document QA sized to the context

def fit_longdoc(tokenizer, seq_len: int, filler=None, fill: float = 0.85) -> LongDocQAConfig:
    """A longdoc_qa config whose conversations take about `fill` x seq_len tokens, measured on probe examples
    with this tokenizer and filler (4096 vocab + books, 512 tokens: ~210 words, 1-2% dropped). Smaller contexts get
    fewer facts. Examples that still do not fit are dropped by the batcher and counted."""
    n = max(1, min(8, seq_len // 128))
    cfg = LongDocQAConfig(n_facts=n, n_distractors=n, seed=12345)
    sizes, tokens = [], []
    for words in (100, 400):
        for conv in longdoc_qa(8, replace(cfg, doc_words=words), filler, split="probe"):
            sizes.append(conv["meta"]["doc_words"])
            tokens.append(len(tokenizer.render_conversation(conv)[0]))
    slope, intercept = np.polyfit(sizes, tokens, 1)  # tokens ~ intercept + slope * words
    words = int((fill * (seq_len + 1) - intercept) / slope)
    if words < 1:
        print0(f"longdoc_qa: a context of {seq_len} tokens is too small for a document (each example needs "
               f"~{intercept:.0f} tokens besides it); most examples will be dropped")
    return replace(cfg, doc_words=max(1, words), seed=0)


def longdoc_setup(tokenizer, seq_len: int, filler_source: str, pretrain_data: str, text_column: str = "text"):
    """(train filler, val filler, LongDocQAConfig) for a context of seq_len tokens; fillers are
    paragraphs of the pretraining corpus' train/val splits, or None for synthetic text."""
    train_filler = val_filler = None
    if filler_source == "pretraining":
        data_dir = prepare(pretrain_data, text_column)
        train_filler, val_filler = filler_paragraphs(data_dir, "train"), filler_paragraphs(data_dir, "val")
    cfg = fit_longdoc(tokenizer, seq_len, train_filler)
    print0(f"longdoc_qa: documents of {cfg.doc_words} words ({cfg.n_facts} facts, {cfg.n_distractors} distractors) "
           f"for a context of {seq_len} tokens, filler: {filler_source}")
    return train_filler, val_filler, cfg


# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate_loss(model, batches, amp) -> float:
    """Mean loss (nats) per target token over all (x, y) batches, summed over ranks."""
    device = model.lm_head.weight.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in batches:
        with amp:
            loss = model(x, y, loss_reduction="none")  # [B, t], 0 where y = -1
        total += loss.sum().double()
        count += (y >= 0).sum()
    if dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    return total.item() / max(count.item(), 1)


def memory_summary(history: dict, last: int = 20) -> dict:
    """The report's figures of the MegaContext rehearsal: the memory rows' loss and LensNet's hit rate, mean of the
    last steps; empty without one."""
    if not history.get("memory_loss"):
        return {}
    mean = lambda key: sum(history[key][-last:]) / len(history[key][-last:])  # noqa: E731
    return {f"memory rows: loss (last {last} steps)": mean("memory_loss"),
            f"memory rows: LensNet hit rate (last {last} steps)": mean("lens_hit")}


def pretraining_data(meta: dict) -> tuple[str, str]:
    """The pretraining data source behind a checkpoint of any stage, and its --text_column."""
    if meta.get("pretrain_data"):
        return meta["pretrain_data"], meta.get("pretrain_text_column", "text")
    return meta["train_config"]["data"], meta["train_config"].get("text_column", "text")


# -----------------------------------------------------------------------------
# the training procedure

@dataclass
class ChatTrainConfig:
    """Flags of both fine-tuning scripts; each script's subclass sets its own defaults."""
    # source model and data
    source: str = field(default="base", metadata={"help": "stage of the checkpoint to start from", "choices": ["base", "mid"]})
    source_tag: str = field(default="", metadata={"help": "its tag (default: the most recently written)"})
    source_step: int = field(default=-1, metadata={"min": -1, "help": "its step (-1 = the last)"})
    data: str = field(default="identity,longdoc_qa", metadata={"help": "conversation mix, e.g. smoltalk,identity:0.1,longdoc_qa,my.jsonl (see nanochat/chat_data.py)"})
    num_conversations: int = field(default=10_000, metadata={"min": 1, "help": "training conversations drawn from the mix"})
    val_conversations: int = field(default=200, metadata={"min": 1, "help": "held-out conversations for the validation loss"})
    longdoc_filler: str = field(default="pretraining", metadata={"help": "longdoc_qa filler text", "choices": ["pretraining", "synthetic"]})
    # horizon and batch
    num_iterations: int = field(default=500, metadata={"min": 1, "help": "optimizer steps"})
    rows_per_step: int = field(default=32, metadata={"min": 1, "help": "rows per optimizer step over all ranks and micro-batches"})
    device_batch_size: int = field(default=8, metadata={"min": 1, "help": "rows per forward pass on each rank"})
    # optimization
    init_lr_frac: float = field(default=1.0, metadata={"min": 0, "help": "scale of all the learning rates below"})
    matrix_lr: float = field(default=0.02, metadata={"min": 0, "help": "Muon learning rate of the block matrices"})
    embedding_lr: float = field(default=0.2, metadata={"min": 0, "help": "AdamW learning rate of the token embedding"})
    unembedding_lr: float = field(default=0.004, metadata={"min": 0, "help": "AdamW learning rate of the LM head"})
    weight_decay: float = field(default=0.0, metadata={"min": 0, "help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.0, metadata={"min": 0, "help": "fraction of steps of linear LR warmup"})
    warmdown_ratio: float = field(default=0.5, metadata={"min": 0, "help": "fraction of final steps of linear LR decay"})
    final_lr_frac: float = field(default=0.0, metadata={"min": 0, "help": "LR at the end, as a fraction of the peak"})
    grad_clip: float = field(default=1.0, metadata={"min": 0, "help": "clip the global gradient norm (0 = off)"})
    # evaluation, checkpoints, logging, runtime
    eval_every: int = field(default=100, metadata={"min": 1, "help": "validation loss every N steps (and at start and end)"})
    save_every: int = field(default=-1, metadata={"min": -1, "help": "checkpoint every N steps (-1 = only at the end)"})
    log_every: int = field(default=10, metadata={"min": 1, "help": "print a log line every N steps"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint of --tag (every flag but the logging ones must match)"})
    overwrite: bool = field(default=False, metadata={"help": "a new run into a --tag that holds checkpoints moves them aside (to <tag>.replaced-<time>); without it such a run is refused"})
    tag: str = field(default="", metadata={"help": "checkpoint directory name (default: the source's tag)"})
    wandb_run: str = field(default="", metadata={"help": "wandb run name; empty = wandb off"})
    device_type: str = field(default="", metadata={"help": "cuda|mps|cpu (empty = autodetect)"})
    cpu_bf16: str = field(default="auto", metadata={"help": "bf16 autocast on CPU: auto = where this CPU's bf16 matmuls are faster than fp32", "choices": CPU_BF16_CHOICES})
    compile: str = field(default="auto", metadata={"help": f"torch.compile the GPT (packed rows only): auto = on CUDA, and on CPU for runs of >= {CPU_COMPILE_MIN_STEPS} steps", "choices": COMPILE_CHOICES})
    seed: int = field(default=42, metadata={"help": "seed of the data mix and order"})
    # MegaContext checkpoints
    mc_memory_rows: int = field(default=0, metadata={"min": 0, "help": "with a MegaContext checkpoint: memory rows (a fact told early in a conversation, asked at its end) per step and rank, trained through working contexts as base_train --mc does (GPT, GistNet, LensNet); 0 = GistNet and LensNet ride along untrained. A trade: more chat memory, less long-document QA (mc/rehearsal.py)"})


# flags that may differ on --resume (how it starts, what it logs); every other flag must match the saved run
RESUME_FREE = ("resume", "overwrite", "tag", "source_tag", "source_step", "eval_every", "save_every", "log_every",
               "wandb_run")


def validate(cfg: ChatTrainConfig, world_size: int) -> int:
    """Check flag combinations; return the number of gradient-accumulation steps."""
    rows_per_fwd = cfg.device_batch_size * world_size
    if cfg.device_batch_size < 1 or cfg.rows_per_step < 1 or cfg.rows_per_step % rows_per_fwd:
        raise ConfigError(f"--rows_per_step={cfg.rows_per_step} must be a positive multiple of "
                          f"--device_batch_size x ranks = {rows_per_fwd}")
    if cfg.overwrite and cfg.resume:
        raise ConfigError("--overwrite starts a new run and --resume continues one: give one of them")
    if cfg.num_iterations < 1:
        raise ConfigError(f"--num_iterations must be >= 1, got {cfg.num_iterations}")
    if cfg.num_conversations < world_size or cfg.val_conversations < world_size:
        raise ConfigError(f"--num_conversations and --val_conversations must be >= the number of ranks ({world_size})")
    if not 0 <= cfg.warmup_ratio + cfg.warmdown_ratio <= 1:
        raise ConfigError("--warmup_ratio + --warmdown_ratio must lie in [0, 1]")
    return cfg.rows_per_step // rows_per_fwd


def train_chat(cfg: ChatTrainConfig, stage: str, pack: bool, report_stage: str, title: str, rehearsal=None):
    """Fine-tune the source checkpoint on conversations into checkpoints/<stage>/<tag>. rehearsal: for a MegaContext
    checkpoint, the class that trains its nets on memory rows beside the conversations (mc.rehearsal.MemoryRehearsal;
    the scripts pass it in, since nanochat does not import mc): called as rehearsal(model, states, meta, rows, data,
    text_column, tokenizer, seed=, rank=, world_size=, device=), it has modules(), describe(), step(step) -> (loss,
    metrics) and state_dict() / load_state_dict()."""
    _, rank, _, world_size, device = compute_init(cfg.device_type)
    master = rank == 0
    grad_accum = validate(cfg, world_size)
    amp_dtype = autocast_dtype(device.type, cfg.cpu_bf16)
    amp = autocast_ctx(device.type, amp_dtype)
    tokenizer = get_tokenizer()

    # the model: the source checkpoint, or on --resume this stage's own last checkpoint
    source_dir = resolve_checkpoint_dir(cfg.source, cfg.source_tag) if not (cfg.resume and cfg.tag) else None
    tag = cfg.tag or source_dir.name
    ckpt_dir = checkpoint_dir(stage, tag)
    if cfg.resume:
        start_step = find_last_step(ckpt_dir)
        model, states, meta = build_model(ckpt_dir, start_step, device, phase="train")
        if changes := config_changes(saved_train_config(meta), asdict(cfg), RESUME_FREE, asdict(type(cfg)())):
            raise ConfigError(f"--resume: the run in {ckpt_dir} was trained with other flags (saved -> given): "
                              f"{'; '.join(changes)}")
        source = meta["source"]
        amp_dtype = resumed_autocast_dtype(amp_dtype, cfg.cpu_bf16, meta.get("autocast"))
        amp = autocast_ctx(device.type, amp_dtype)
    else:
        claim_run_dir(ckpt_dir, cfg.overwrite, rank)
        start_step = 0
        model, states, meta = build_model(source_dir, None if cfg.source_step < 0 else cfg.source_step, device, phase="train")
        source = {"stage": cfg.source, "dir": str(source_dir), "step": meta["step"]}
    if meta.get("tokenizer") != tokenizer.identity():
        raise CheckpointError("the checkpoint was trained with a different tokenizer than the one in "
                              "$MC_BASE_DIR/tokenizer")
    pretrain_data, pretrain_text_column = pretraining_data(meta)
    seq_len = model.config.sequence_len
    # the checkpoint's other modules (a MegaContext checkpoint's GistNet and LensNet) are saved with this stage's
    # checkpoint, so the chat model keeps its unbounded-history memory (chat_cli --mc): trained on memory rows
    # beside the conversations (--mc_memory_rows, `rehearsal`), or with 0 carried along as saved (state dicts)
    carried = {name: state for name, state in states.items() if name != "gpt"}
    carried_meta = {"mc_config": meta["mc_config"]} if "mc_config" in meta else {}
    side = None
    if carried_meta and cfg.mc_memory_rows > 0:
        if rehearsal is None:
            raise ConfigError("this caller trains no MegaContext nets: give --mc_memory_rows=0 to carry them along untrained")
        try:
            side = rehearsal(model, states, meta, cfg.mc_memory_rows, pretrain_data, pretrain_text_column, tokenizer,
                             seed=cfg.seed, rank=rank, world_size=world_size, device=device)
        except ValueError as e:  # e.g. a context too short for a memory conversation
            raise ConfigError(f"--mc_memory_rows={cfg.mc_memory_rows}: {e}") from None
        carried = {name: state for name, state in carried.items() if name not in side.modules()}
    side_modules = side.modules() if side else {}
    params = [p for module in (model, *side_modules.values()) for p in module.parameters()]

    # conversations: train and held-out val mixes from the same spec
    filler, val_filler, longdoc_cfg = longdoc_setup(tokenizer, seq_len, cfg.longdoc_filler, pretrain_data, pretrain_text_column)
    try:
        train_convs = load_conversations(cfg.data, cfg.num_conversations, cfg.seed, "train", filler, longdoc_cfg)
        val_convs = load_conversations(cfg.data, cfg.val_conversations, cfg.seed, "val", val_filler, longdoc_cfg)
    except ValueError as e:
        raise ConfigError(f"--data={cfg.data}: {e}") from None
    batcher = ChatBatcher(tokenizer, train_convs, cfg.device_batch_size, seq_len, pack, cfg.seed, rank, world_size, device)

    muon_nets, adam_nets = side.optimizer_split() if side else ([], [])
    optimizers = build_optimizers(model, muon_nets, adam_nets, matrix_lr=cfg.matrix_lr * cfg.init_lr_frac,
                                  embedding_lr=cfg.embedding_lr * cfg.init_lr_frac,
                                  unembedding_lr=cfg.unembedding_lr * cfg.init_lr_frac, weight_decay=cfg.weight_decay,
                                  ns_dtype=amp_dtype)
    history = meta["history"] if cfg.resume else {"step": [], "loss": [], "val_step": [], "val_loss": [],
                                                   "memory_loss": [], "lens_hit": []}
    if cfg.resume:
        training_state = load_training_state(ckpt_dir, start_step, rank, device)
        for opt, state in zip(optimizers, training_state["optimizers"]):
            opt.load_state_dict(state)
        restore_rng(training_state["rng"])
        batcher.load_state_dict(training_state["rank_state"]["batcher"])
        if side:
            if "rehearsal" not in training_state["rank_state"]:
                raise ConfigError(f"--resume: the run in {ckpt_dir} trained no MegaContext nets: give --mc_memory_rows=0")
            side.load_state_dict(training_state["rank_state"]["rehearsal"])
        print0(f"resumed from {ckpt_dir} at step {start_step}")
    compiled = pack and use_compile(device.type, cfg.compile, cfg.num_iterations)
    train_model = torch.compile(model, dynamic=False) if compiled else model
    print0(f"{stage}: {source['stage']} checkpoint {source['dir']} step {source['step']} -> {ckpt_dir}; "
           f"{cfg.num_iterations} steps x {cfg.rows_per_step} rows ({'packed' if pack else 'padded'}, "
           f"{grad_accum} micro-batches of {cfg.device_batch_size} on {world_size} rank(s)), context {seq_len}, "
           f"device {device}, autocast {amp_dtype}, compile {'on' if compiled else 'off'}")
    if side:
        print0(f"MegaContext rehearsal: {side.describe()}")
    elif carried_meta:
        print0("MegaContext: GistNet and LensNet ride along untrained (--mc_memory_rows=0)")

    def val_batches():  # the whole val set, in a fixed order
        return ChatBatcher(tokenizer, val_convs, cfg.device_batch_size, seq_len, pack, 0, rank, world_size, device,
                           single_pass=True)

    def validation_loss():
        model.eval()
        loss = evaluate_loss(model, val_batches(), amp)
        model.train()
        return loss

    def save(step: int, val_loss: float):
        meta = model_meta(model, train_config=asdict(cfg), source=source, pretrain_data=pretrain_data,
                          pretrain_text_column=pretrain_text_column, history=history, val_loss=val_loss,
                          autocast=str(amp_dtype),
                          tokenizer=tokenizer.identity(), **carried_meta)
        rank_state = {"batcher": batcher.state_dict(), **({"rehearsal": side.state_dict()} if side else {})}
        save_checkpoint(ckpt_dir, step, {"gpt": model, **carried, **side_modules}, optimizers, meta, rank, rank_state)

    wandb_run = start_run(cfg.wandb_run, stage, {"train": asdict(cfg), "model": asdict(model.config),
                                                  "mc": meta.get("mc_config"), "source": source}, master)
    val_loss, train_time, smooth_loss, step = float("nan"), 0.0, 0.0, start_step
    progress = Progress(cfg.num_iterations, start_step, stage, enabled=master)
    while True:
        last = step == cfg.num_iterations
        with tracing.span("train.step", step=step, rank=rank, micro_batches=grad_accum, rows=cfg.rows_per_step):
            if last or step == 0 or (cfg.eval_every > 0 and step % cfg.eval_every == 0 and step > start_step):
                with tracing.span("validation", step=step):
                    val_loss = validation_loss()
                history["val_step"].append(step)
                history["val_loss"].append(val_loss)
                progress.log(f"val loss {val_loss:.4f}")
                wandb_run.log({"step": step, "val/loss": val_loss})
            if last or (cfg.save_every > 0 and step % cfg.save_every == 0 and step > start_step):
                with tracing.span("checkpoint", step=step):
                    save(step, val_loss)
            if last:
                break

            synchronize(device)
            t0 = time.perf_counter()
            lrm = lr_multiplier(step, cfg.num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
            set_lr(optimizers, lrm)
            loss_sum = torch.zeros((), device=device)
            for micro in range(grad_accum):
                x, y = next(batcher)
                with tracing.span("micro_batch", index=micro, rows=x.size(0), tokens=x.numel()):
                    with amp:
                        loss = train_model(x, y, loss_reduction="none").sum() / (y >= 0).sum().clamp(min=1)
                    (loss / grad_accum).backward()
                loss_sum += loss.detach()
            if side:
                with tracing.span("mc_rehearsal", rows=cfg.mc_memory_rows):
                    with amp:
                        memory_loss, memory_metrics = side.step(step)
                    memory_loss.backward()
            with tracing.span("optimizer", step=step):
                optimizer_step(optimizers, params, cfg.grad_clip)
                train_loss = (loss_sum / grad_accum).item()
                synchronize(device)
        dt, step = time.perf_counter() - t0, step + 1
        if not math.isfinite(train_loss):
            raise RuntimeError(f"training loss became {train_loss} at step {step}; lower --init_lr_frac")
        train_time += dt
        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased = smooth_loss / (1 - 0.9 ** (step - start_step))
        history["step"].append(step)
        history["loss"].append(train_loss)
        memory = ""
        if side:
            history["memory_loss"].append(memory_metrics["lm_loss"])
            history["lens_hit"].append(memory_metrics["lens_hit"])
            memory = f" | memory rows: loss {memory_metrics['lm_loss']:.3f}, LensNet hit {memory_metrics['lens_hit']:.2f}"
            wandb_run.log({"step": step, "train/memory_loss": memory_metrics["lm_loss"],
                           "train/lens_hit": memory_metrics["lens_hit"]})
        progress.update(loss=f"{debiased:.3f}", epoch=batcher.epoch)
        if step % cfg.log_every == 0:
            progress.log(f"loss {debiased:.4f} | lr x{lrm:.2f} | {dt * 1000:.0f} ms | epoch {batcher.epoch}{memory}")
        wandb_run.log({"step": step, "train/loss": train_loss, "train/lrm": lrm, "train/step_ms": dt * 1000,
                       "train/epoch": batcher.epoch})
    progress.close()
    model.eval()  # the final model's val bpb, comparable across stages (the report's summary)
    val_bpb = evaluate_bpb(model, val_batches(), None, tokenizer.token_bytes(device), amp)

    if master:
        report.plot_curves(get_report_dir() / f"{stage}_loss.png", {"train": (history["step"], history["loss"]),
                           "val": (history["val_step"], history["val_loss"])}, "step", "nats per target token", title)
        fill, dropped = batcher.real_tokens / max(batcher.total_tokens, 1), f"{batcher.dropped} of {batcher.visited}"
        report.log_section(report_stage, title, [
            {"source": f"{source['stage']} {source['dir']} step {source['step']}", "data": cfg.data,
             "conversations": f"{len(train_convs)} train / {len(val_convs)} val",
             "longdoc_qa documents": f"{longdoc_cfg.doc_words} words ({cfg.longdoc_filler} filler)",
             "layout": "packed rows" if pack else "one conversation per row", "context": seq_len,
             "steps": cfg.num_iterations, "rows per step": cfg.rows_per_step, "epochs seen": batcher.epoch,
             "dropped as longer than the context": dropped, "row fill (non-padding tokens)": f"{fill:.1%}",
             **({"MegaContext rehearsal": side.describe()} if side else {})},
            {**memory_summary(history), "initial val loss": history["val_loss"][0], "final val loss": val_loss, "final val bpb": val_bpb,
             "training time": f"{train_time / 60:.2f} min", "checkpoint": str(ckpt_dir),
             **({"wandb run": run_link(wandb_run)} if run_link(wandb_run) else {})},
            ("img", f"{stage}_loss.png"),
            "Config: `" + json.dumps(asdict(cfg)) + "`",
        ])
        print0(f"done: val loss {val_loss:.4f} (bpb {val_bpb:.4f}), {dropped} conversations dropped as longer than the "
               f"context, row fill {fill:.1%}, checkpoint in {ckpt_dir}")
    wandb_run.finish()
    tracing.shutdown()
    compute_cleanup()
    return val_loss


def main(cfg: ChatTrainConfig, **kwargs):
    """Run train_chat; user errors end the program with `error: ...` instead of a traceback."""
    try:
        return train_chat(cfg, **kwargs)
    except (ConfigError, CheckpointError, DataError, TokenizerError, FileNotFoundError) as e:
        compute_cleanup()
        sys.exit(f"error: {e}")
