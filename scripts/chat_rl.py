"""Reinforcement learning on GSM8K: policy gradient on sampled answers, after SFT.

    python -m scripts.chat_rl                            # from the most recent SFT checkpoint
    python -m scripts.chat_rl --source_tag=d20 --num_steps=100
    torchrun --nproc_per_node=8 -m scripts.chat_rl

Each step takes --questions_per_step training questions (shared out over the ranks). For each, the engine
samples --samples_per_question replies (temperature, top-k); a reply earns reward 1 when its last number is
the reference answer, else 0 (nanochat/gsm8k.py). The objective is REINFORCE with the question's mean
reward as baseline, on policy (no reference model, no ratio clipping):
    advantage_i = reward_i - mean(reward of that question's samples)
    loss        = -sum_i advantage_i * sum_t log p(reply_i[t]) / (reply tokens of that question's samples)
so replies better than their siblings become more likely and worse ones less; a question whose samples all
earn the same reward gives no gradient. Questions whose prompt does not fit the context are dropped
and counted. The LR decays linearly to zero over the run (Muon + AdamW, nanochat/optim.py).
Every --eval_every steps (and at the start and end), pass@1: greedy accuracy on held-out questions.

Data: `--data=gsm8k` trains on the hub's train split and evaluates on its test split (offline: nothing to
train on, an error); `--data=PATH.jsonl` reads GSM8K rows {"question", "answer"} and holds out its last ~5%.
Only the GPT is trained. A MegaContext checkpoint's GistNet and LensNet states ride along unchanged (as in
mid/SFT), so `chat_cli --mc --source=rl` keeps its memory; rollouts use the plain model, since GSM8K
prompts fit the context. Checkpoints go to checkpoints/rl/<tag> (default: the source's tag); there is no
--resume. Report section "chat-rl".
"""

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from nanochat import gsm8k, report
from nanochat.chat_data import VAL_FRACTION, load_hub
from nanochat.chat_tasks import TASKS, load_examples
from nanochat.chat_train import ConfigError, pretraining_data
from nanochat.checkpoint import (CheckpointError, build_model, checkpoint_dir, claim_run_dir, model_meta,
                                 resolve_checkpoint_dir, save_checkpoint)
from nanochat.common import (CPU_BF16_CHOICES, autocast_ctx, autocast_dtype, compute_cleanup, compute_init,
                             get_report_dir, print0)
from nanochat.configurator import FlagParser, add_dataclass_args, dataclass_from_args
from nanochat.engine import Engine
from nanochat.optim import build_optimizers, lr_multiplier, optimizer_step, set_lr
from nanochat.progress import Progress
from nanochat.tokenizer import TokenizerError, get_tokenizer
from nanochat.tracking import run_link, start_run


@dataclass
class RLConfig:
    # source model and data
    source: str = field(default="sft", metadata={"help": "stage of the checkpoint to start from", "choices": ["mid", "sft"]})
    source_tag: str = field(default="", metadata={"help": "its tag (default: the most recently written)"})
    source_step: int = field(default=-1, metadata={"min": -1, "help": "its step (-1 = the last)"})
    data: str = field(default="gsm8k", metadata={"help": "gsm8k (the HF hub: train split, test split held out) or a .jsonl of GSM8K rows {question, answer} (its last ~5%% held out)"})
    # horizon and sampling
    num_steps: int = field(default=-1, metadata={"min": -1, "help": "optimizer steps (-1 = one pass over the training questions)"})
    questions_per_step: int = field(default=16, metadata={"min": 1, "help": "questions per step over all ranks"})
    samples_per_question: int = field(default=16, metadata={"min": 2, "help": "sampled replies per question (the baseline is their mean reward)"})
    device_batch_size: int = field(default=8, metadata={"min": 1, "help": "rows per sampling call and per forward pass"})
    max_new_tokens: int = field(default=256, metadata={"min": 1, "help": "longest reply, in tokens"})
    temperature: float = field(default=1.0, metadata={"min": 0, "help": "sampling temperature of the rollouts"})
    top_k: int = field(default=50, metadata={"min": 0, "help": "sample among the k most likely tokens (0 = all)"})
    # optimization
    init_lr_frac: float = field(default=0.05, metadata={"min": 0, "help": "scale of all the learning rates below"})
    matrix_lr: float = field(default=0.02, metadata={"min": 0, "help": "Muon learning rate of the block matrices"})
    embedding_lr: float = field(default=0.2, metadata={"min": 0, "help": "AdamW learning rate of the token embedding"})
    unembedding_lr: float = field(default=0.004, metadata={"min": 0, "help": "AdamW learning rate of the LM head"})
    weight_decay: float = field(default=0.0, metadata={"min": 0, "help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"min": 0, "help": "clip the global gradient norm (0 = off)"})
    # evaluation, checkpoints, logging, runtime
    num_eval: int = field(default=400, metadata={"min": 1, "help": "held-out questions of the pass@1 evaluation"})
    eval_every: int = field(default=60, metadata={"min": 1, "help": "pass@1 every N steps (and at start and end)"})
    save_every: int = field(default=-1, metadata={"min": -1, "help": "checkpoint every N steps (-1 = only at the end)"})
    log_every: int = field(default=1, metadata={"min": 1, "help": "print a log line every N steps"})
    overwrite: bool = field(default=False, metadata={"help": "a run into a --tag that holds checkpoints moves them aside (to <tag>.replaced-<time>); without it such a run is refused"})
    tag: str = field(default="", metadata={"help": "checkpoint directory name (default: the source's tag)"})
    wandb_run: str = field(default="", metadata={"help": "wandb run name; empty = wandb off"})
    device_type: str = field(default="", metadata={"help": "cuda|mps|cpu (empty = autodetect)"})
    cpu_bf16: str = field(default="auto", metadata={"help": "bf16 autocast on CPU: auto = where this CPU's bf16 matmuls are faster than fp32", "choices": CPU_BF16_CHOICES})
    seed: int = field(default=42, metadata={"help": "seed of the question order and the sampling"})


# -----------------------------------------------------------------------------
# questions

ALL = 10**9  # as a row count: every row there is


def load_questions(cfg: RLConfig) -> tuple[list[dict], list[dict], str]:
    """(training questions, held-out questions, where they came from); ConfigError when there are none."""
    if cfg.data == "gsm8k":
        train = load_hub("gsm8k", ALL, cfg.seed, "train")
        held_out = load_hub("gsm8k", cfg.num_eval, cfg.seed, "val")
        if not train or not held_out:
            raise ConfigError("nothing to train on: GSM8K is unavailable (offline, see the line above); "
                              "give --data=PATH.jsonl of GSM8K rows to train on local questions")
        return train, held_out, "GSM8K (HF hub): train split, test split held out"
    if not cfg.data.endswith(".jsonl"):
        raise ConfigError(f"--data={cfg.data}: expected gsm8k or a path to a .jsonl file of GSM8K rows")
    try:
        rows = load_examples(TASKS["gsm8k"], ALL, path=cfg.data)  # the hub's row schema, as chat_eval --gsm8k_data
    except (OSError, ValueError) as e:
        raise ConfigError(f"--data: {e}") from None
    if len(rows) < 2:
        raise ConfigError(f"--data={cfg.data}: nothing to train on: it needs at least 2 rows (training and held out)")
    n_val = max(1, round(VAL_FRACTION * len(rows)))
    return rows[:-n_val], rows[-n_val:][:cfg.num_eval], f"{cfg.data}: last {n_val} rows held out"


def prompts_that_fit(tokenizer, questions: list[dict], context: int) -> list[tuple[list[int], str]]:
    """(prompt ids, reference answer) of every question whose prompt leaves room for a reply in the context."""
    prompts = [(tokenizer.render_for_completion(q["messages"][:1]), gsm8k.answer_of(q)) for q in questions]
    return [(prompt, answer) for prompt, answer in prompts if len(prompt) < context]


# -----------------------------------------------------------------------------
# rollouts and the objective

def stop_tokens(tokenizer) -> list[int]:
    """What ends a reply: <|assistant_end|>, or BOS (a model that skips assistant_end starts a new document)."""
    return [tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id]


def sample_replies(engine, tokenizer, prompt: list[int], num_samples: int, max_tokens: int, temperature: float = 0.0,
                   top_k: int | None = None, seed: int = 0) -> list[list[int]]:
    """The reply tokens of num_samples samples of one prompt, each up to and including its stop token."""
    rows = engine.generate_batch(prompt, num_samples, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                 seed=seed, stop_tokens=stop_tokens(tokenizer))
    return [row[len(prompt):] for row in rows]


def reply_text(tokenizer, reply: list[int]) -> str:
    """A reply's text without its stop token."""
    return tokenizer.decode([t for t in reply if t not in stop_tokens(tokenizer)])


def rollout(engine, tokenizer, prompt: list[int], answer: str, cfg: RLConfig, max_tokens: int, seed: int):
    """cfg.samples_per_question sampled replies to one prompt (ids up to and including the stop token), sampled
    in calls of cfg.device_batch_size rows, and their rewards [S]."""
    replies = []
    for call, start in enumerate(range(0, cfg.samples_per_question, cfg.device_batch_size)):
        rows = min(cfg.device_batch_size, cfg.samples_per_question - start)
        replies += sample_replies(engine, tokenizer, prompt, rows, max_tokens, cfg.temperature, cfg.top_k or None, seed + call)
    rewards = torch.tensor([gsm8k.reward(reply_text(tokenizer, reply), answer) for reply in replies])
    return replies, rewards


def policy_batch(prompt: list[int], replies: list[list[int]], pad_id: int, device):
    """(x, y) [S, t] for the rows prompt + reply, right-padded: y is the next token on the reply's tokens, else -1."""
    P, lengths = len(prompt), torch.tensor([len(r) for r in replies])  # [S]
    ids = np.full((len(replies), P + int(lengths.max())), pad_id, dtype=np.int64)
    ids[:, :P] = prompt
    for i, reply in enumerate(replies):
        ids[i, P:P + len(reply)] = reply
    ids = torch.from_numpy(ids)
    position = torch.arange(1, ids.size(1))  # the position of each target token
    is_reply = (position[None, :] >= P) & (position[None, :] < P + lengths[:, None])  # [S, t]
    return ids[:, :-1].to(device), torch.where(is_reply, ids[:, 1:], -1).to(device)


def policy_gradient_loss(model, x, y, advantages, n_tokens):
    """-sum over rows and reply tokens of advantage x log p(token), divided by n_tokens."""
    logp = -model(x, y, loss_reduction="none")  # [S, t], 0 where y = -1
    return -(advantages[:, None] * logp).sum() / n_tokens


def pass_at_1(engine, tokenizer, held_out, context: int, max_tokens: int, rank: int, world_size: int, device) -> float:
    """Greedy accuracy on the held-out (prompt, answer) pairs, each rank answering every world_size-th."""
    mine, correct = held_out[rank::world_size], 0.0
    for prompt, answer in mine:
        reply = sample_replies(engine, tokenizer, prompt, 1, min(max_tokens, context - len(prompt)))[0]
        correct += gsm8k.reward(reply_text(tokenizer, reply), answer)
    counts = torch.tensor([correct, len(mine)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return (counts[0] / counts[1].clamp(min=1)).item()


# -----------------------------------------------------------------------------
# the training procedure

def validate(cfg: RLConfig, world_size: int) -> int:
    """Check flag combinations; return the number of questions each rank takes per step."""
    if cfg.questions_per_step % world_size:
        raise ConfigError(f"--questions_per_step={cfg.questions_per_step} must be a multiple of the number of ranks ({world_size})")
    return cfg.questions_per_step // world_size


def train_rl(cfg: RLConfig):
    _, rank, _, world_size, device = compute_init(cfg.device_type)
    master = rank == 0
    questions_per_rank = validate(cfg, world_size)
    amp_dtype = autocast_dtype(device.type, cfg.cpu_bf16)
    amp = autocast_ctx(device.type, amp_dtype)
    tokenizer = get_tokenizer()

    source_dir = resolve_checkpoint_dir(cfg.source, cfg.source_tag)
    tag = cfg.tag or source_dir.name
    ckpt_dir = checkpoint_dir("rl", tag)
    claim_run_dir(ckpt_dir, cfg.overwrite, rank)
    model, states, meta = build_model(source_dir, None if cfg.source_step < 0 else cfg.source_step, device, phase="train")
    if meta.get("tokenizer") != tokenizer.identity():
        raise CheckpointError("the checkpoint was trained with a different tokenizer than the one in $MC_BASE_DIR/tokenizer")
    source = {"stage": cfg.source, "dir": str(source_dir), "step": meta["step"]}
    carried = {name: state for name, state in states.items() if name != "gpt"}  # MegaContext nets, unchanged
    carried_meta = {"mc_config": meta["mc_config"]} if "mc_config" in meta else {}
    pretrain_data, pretrain_text_column = pretraining_data(meta)
    context = model.config.sequence_len

    train_questions, held_out, data_note = load_questions(cfg)
    train = prompts_that_fit(tokenizer, train_questions, context)
    dropped = len(train_questions) - len(train)
    held_out = prompts_that_fit(tokenizer, held_out, context)
    if not train or not held_out:
        raise ConfigError(f"nothing to train on: no {'training' if not train else 'held-out'} question of --data={cfg.data} "
                          f"fits the model's context of {context} tokens")
    num_steps = cfg.num_steps if cfg.num_steps > 0 else max(1, len(train) // cfg.questions_per_step)

    optimizers = build_optimizers(model, matrix_lr=cfg.matrix_lr * cfg.init_lr_frac,
                                  embedding_lr=cfg.embedding_lr * cfg.init_lr_frac,
                                  unembedding_lr=cfg.unembedding_lr * cfg.init_lr_frac, weight_decay=cfg.weight_decay,
                                  ns_dtype=amp_dtype)
    params = list(model.parameters())
    engine = Engine(model, autocast=lambda: autocast_ctx(device.type, amp_dtype))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    print0(f"rl: {source['stage']} checkpoint {source_dir} step {source['step']} -> {ckpt_dir}; {data_note}: "
           f"{len(train)} training questions ({dropped} dropped as longer than the context), {len(held_out)} held out; "
           f"{num_steps} steps x {cfg.questions_per_step} questions x {cfg.samples_per_question} samples on "
           f"{world_size} rank(s), context {context}, device {device}, autocast {amp_dtype}")

    history = {"step": [], "reward": [], "loss": [], "reply_tokens": [], "eval_step": [], "pass1": []}

    def save(step: int):
        meta = model_meta(model, train_config=asdict(cfg), source=source, pretrain_data=pretrain_data,
                          pretrain_text_column=pretrain_text_column, history=history, autocast=str(amp_dtype),
                          tokenizer=tokenizer.identity(), **carried_meta)
        save_checkpoint(ckpt_dir, step, {"gpt": model, **carried}, None, meta, rank)

    wandb_run = start_run(cfg.wandb_run, "rl", {"train": asdict(cfg), "model": asdict(model.config),
                                                "mc": meta.get("mc_config"), "source": source}, master)
    progress = Progress(num_steps, 0, "rl", enabled=master)
    train_time, step = 0.0, 0
    while True:
        last = step == num_steps
        if last or step % cfg.eval_every == 0:
            pass1 = pass_at_1(engine, tokenizer, held_out, context, cfg.max_new_tokens, rank, world_size, device)
            history["eval_step"].append(step)
            history["pass1"].append(pass1)
            progress.log(f"pass@1 {pass1:.4f} on {len(held_out)} held-out questions")
            wandb_run.log({"step": step, "eval/pass@1": pass1})
        if last or (cfg.save_every > 0 and step % cfg.save_every == 0 and step > 0):
            save(step)
        if last:
            break

        t0 = time.perf_counter()
        lrm = lr_multiplier(step, num_steps, 0.0, 1.0, 0.0)
        set_lr(optimizers, lrm)
        stats = torch.zeros(4, dtype=torch.float64, device=device)  # reward sum, samples, reply tokens, loss sum
        for slot in range(rank, cfg.questions_per_step, world_size):
            prompt, answer = train[order[(step * cfg.questions_per_step + slot) % len(train)]]
            seed = (cfg.seed * 1_000_003 + step) * 1_000_003 + slot * 1009  # distinct per (run seed, step, slot)
            replies, rewards = rollout(engine, tokenizer, prompt, answer, cfg, min(cfg.max_new_tokens, context - len(prompt)), seed)
            advantages = (rewards - rewards.mean()).to(device)  # [S]
            x, y = policy_batch(prompt, replies, tokenizer.bos_token_id, device)
            n_tokens = (y >= 0).sum() * questions_per_rank  # the mean over this question's tokens, then over questions
            for start in range(0, x.size(0), cfg.device_batch_size):
                rows = slice(start, start + cfg.device_batch_size)
                with amp:
                    loss = policy_gradient_loss(model, x[rows], y[rows], advantages[rows], n_tokens)
                loss.backward()
                stats[3] += loss.detach()
            stats[:3] += torch.tensor([rewards.sum().item(), len(replies), (y >= 0).sum().item()], dtype=torch.float64, device=device)
        optimizer_step(optimizers, params, cfg.grad_clip)
        if dist.is_initialized():
            dist.all_reduce(stats)
        mean_reward, reply_tokens, loss = (stats[0] / stats[1]).item(), (stats[2] / stats[1]).item(), stats[3].item() / world_size
        if not math.isfinite(loss):
            raise RuntimeError(f"the policy-gradient loss became {loss} at step {step + 1}; lower --init_lr_frac")
        dt, step = time.perf_counter() - t0, step + 1
        train_time += dt
        for key, value in (("step", step), ("reward", mean_reward), ("loss", loss), ("reply_tokens", reply_tokens)):
            history[key].append(value)
        progress.update(reward=f"{mean_reward:.3f}")
        if step % cfg.log_every == 0:
            progress.log(f"reward {mean_reward:.4f} | loss {loss:+.5f} | reply {reply_tokens:.0f} tokens | lr x{lrm:.2f} | {dt:.1f} s")
        wandb_run.log({"step": step, "train/reward": mean_reward, "train/loss": loss, "train/reply_tokens": reply_tokens,
                       "train/lrm": lrm, "train/step_s": dt})
    progress.close()

    if master:
        report.plot_curves(get_report_dir() / "rl_reward.png", {"mean reward": (history["step"], history["reward"]),
                           "pass@1 (held out)": (history["eval_step"], history["pass1"])}, "step", "reward / accuracy", "Chat RL")
        report.log_section("chat-rl", "Chat RL (GSM8K)", [
            {"source": f"{source['stage']} {source['dir']} step {source['step']}", "data": data_note,
             "training questions": f"{len(train)} ({dropped} dropped as longer than the context)",
             "held-out questions": len(held_out), "steps": num_steps, "questions per step": cfg.questions_per_step,
             "samples per question": cfg.samples_per_question, "temperature": cfg.temperature, "top-k": cfg.top_k},
            {"mean reward (first step)": history["reward"][0], "mean reward (last step)": history["reward"][-1],
             "pass@1 before": history["pass1"][0], "pass@1 after": history["pass1"][-1],
             "training time": f"{train_time / 60:.2f} min", "checkpoint": str(ckpt_dir),
             **({"wandb run": run_link(wandb_run)} if run_link(wandb_run) else {})},
            ("img", "rl_reward.png"),
            "Config: `" + json.dumps(asdict(cfg)) + "`",
        ])
        print0(f"done: pass@1 {history['pass1'][0]:.4f} -> {history['pass1'][-1]:.4f}, mean reward "
               f"{history['reward'][0]:.4f} (first step) -> {history['reward'][-1]:.4f} (last), checkpoint in {ckpt_dir}")
    wandb_run.finish()
    compute_cleanup()
    return history


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, RLConfig, title="RL")
    cfg = dataclass_from_args(RLConfig, parser.parse_args(argv))
    try:
        return train_rl(cfg)
    except (ConfigError, CheckpointError, TokenizerError, FileNotFoundError) as e:
        compute_cleanup()
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
