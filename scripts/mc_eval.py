"""Evaluate a MegaContext checkpoint against its baselines at its working-context budget W (docs/architecture.md §10).

    python -m scripts.mc_eval --mc_tag=d4_mc [--plain_tag=d4] [--mean_gist_tag=d4_mean] [--tasks_file=qa.jsonl]

Every task scores the same final E tokens (--tail, default R = the checkpoint's --mc_recent) of each
history under every arm (see mc/arms.py): truncation (last W tokens), mc (LensNet-guided focus), full
(whole history, up to --full_max_len), the ablations no_read_on (mc with each block expanded alone,
without the block after it), gists_only (the most compressed map),
random, similarity, oracle (the answer's blocks expanded), shuffled (gists permuted across positions),
mean_gist (a second checkpoint trained with --mc_gist_type=mean: --mean_gist_tag) and, with
--plain_tag, plain_truncation / plain_full of a checkpoint trained without --mc on the same data.
Histories are multiples of K; MC arms skip lengths that do not fit W even fully compressed.

Tasks (--tasks), on rows from nanochat/longrange.py with filler from the val split (--filler):
  needle        greedy exact match of the whole value (argmax at every answer position equals the
                answer token, teacher-forced) per history length (--lengths, multiples of W, and the
                needle-only --far_lengths, e.g. up to 1024·W) x depth bin, and by the needle's offset
                inside its K-token block; heatmaps + a line plot (log x)
  recall        accuracy (per query) vs number of key -> value pairs at one history length
  ruler         RULER's synthetic tasks (nanochat/ruler.py: niah single / multikey / multikey among needles /
                multivalue / multiquery, variable tracking) per history length: share of answers exactly right
  loss          NLL of the final E tokens as history grows: natural text (val split, the same final
                tokens with a longer and longer history) and `facts` documents (all tail tokens, and
                the far-recall tokens alone); on natural text also per text, paired: mc - plain_truncation
                and mc - truncation, mean difference and its standard error over the texts
  substitution  tail NLL with history blocks as raw tokens / as their gists (most compressed) / absent
                (raw tail only), on the loss task's rows, for lengths up to --full_max_len:
                delta = gists - raw, recovered = (absent - gists) / (absent - raw)
  --tasks_file  a JSONL file of {"context", "question", "answer"} items: exact match of the answer
                after context + blank line + question (left-padded with BOS to a multiple of K)
Outputs: report/mc_eval.json (atomic), report/mc_eval_*.png and the report section "mc-eval".
CPU cost grows with --lengths, --far_lengths, the *_examples and the arms; memory with --batch_tokens.
"""

import argparse
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from mc.arms import ARMS, ArmEvaluator
from mc.build import load_controller
from mc.config import MCConfigError
from mc.working_context import RAW, most_compressed_map, none_map
from nanochat.checkpoint import CheckpointError, build_model, resolve_checkpoint_dir
from nanochat.common import autocast_ctx, autocast_dtype, compute_init, get_report_dir, print0
from nanochat.configurator import FlagParser, add_dataclass_args, dataclass_from_args
from nanochat.dataloader import DataLoader
from nanochat.dataset import DataError, prepare
from nanochat.longrange import DataMixError, LongRange
from nanochat.progress import bar
from nanochat.ruler import TASKS as RULER_TASKS, RulerTasks
from nanochat.tokenizer import TokenizerError, get_tokenizer
from nanochat.tasks_file import TasksFileError, batches, load_tasks_file, tokenize_items
from scripts.mc_eval_report import write_outputs

TASKS = ("needle", "recall", "ruler", "loss", "substitution")
# natural-text tail NLL compared per text (paired, so the texts' own spread cancels): the MC arm against the plain
# twin's truncation (issue 10's fair comparison) and against its own model's truncation
PAIRED = (("mc", "plain_truncation"), ("mc", "truncation"))


class EvalError(ValueError):
    """A flag value or checkpoint combination mc_eval cannot work with; the message names the flag."""


@dataclass
class EvalConfig:
    mc_tag: str = field(default="", metadata={"help": "MC checkpoint (checkpoints/base/<tag>, trained with --mc); default: the latest"})
    plain_tag: str = field(default="", metadata={"help": "plain checkpoint trained on the same data (arms plain_truncation, plain_full)"})
    mean_gist_tag: str = field(default="", metadata={"help": "MC checkpoint trained with --mc_gist_type=mean (arm mean_gist)"})
    data: str = field(default="", metadata={"help": "corpus for filler and natural text (val split); default: the MC checkpoint's --data"})
    filler: str = field(default="corpus", metadata={"help": "filler of synthetic rows", "choices": ["corpus", "synthetic"]})
    tasks: str = field(default=",".join(TASKS), metadata={"help": f"comma list of {', '.join(TASKS)}"})
    arms: str = field(default="all", metadata={"help": f"comma list of arms, or 'all' ({', '.join(ARMS)})"})
    lengths: str = field(default="0.5,1,2,4,8,16", metadata={"help": "history lengths as multiples of W (rounded to multiples of K)"})
    depth_bins: int = field(default=5, metadata={"min": 1, "help": "needle depth bins"})
    offset_bins: int = field(default=8, metadata={"min": 1, "help": "bins of the needle's offset inside its block (at most K)"})
    needle_examples: int = field(default=300, metadata={"min": 1, "help": "needle examples per history length"})
    needle_decoys: int = field(default=-1, metadata={"min": -1, "help": "decoy needles per example (-1: uniform 0..15)"})
    recall_pairs: str = field(default="1,2,4,8,16", metadata={"help": "numbers of key -> value pairs"})
    recall_length: float = field(default=4.0, metadata={"min": 0, "help": "recall history length, as a multiple of W"})
    recall_examples: int = field(default=100, metadata={"min": 1, "help": "recall examples per number of pairs"})
    ruler_examples: int = field(default=24, metadata={"min": 1, "help": "examples per RULER task per history length"})
    loss_examples: int = field(default=32, metadata={"min": 1, "help": "natural-text rows and facts documents per history length"})
    tasks_file: str = field(default="", metadata={"help": "JSONL of {context, question, answer} scored by exact match"})
    far_lengths: str = field(default="", metadata={"help": "needle task only: further history lengths (multiples of W), "
                                                   "--far_examples needles each (e.g. 32,64,128,256,512,1024)"})
    far_examples: int = field(default=24, metadata={"min": 1, "help": "needle examples per length of --far_lengths"})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "examples per forward pass"})
    batch_tokens: int = field(default=262144, metadata={"min": 1, "help": "history tokens per forward pass at most: "
                                                        "long needle histories run fewer than --batch_size rows (memory)"})
    full_max_len: int = field(default=0, metadata={"min": 0, "help": "longest history for full / all-raw (0: 2 x the trained length)"})
    tail: int = field(default=0, metadata={"min": 0, "help": "scored final tokens E (0: R, the checkpoint's --mc_recent)"})
    seed: int = field(default=0, metadata={"min": 0, "help": "seed of examples and random maps"})
    device_type: str = field(default="", metadata={"help": "cuda|mps|cpu (empty = autodetect)"})


def parse_list(text: str, kind, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"--{flag}={text!r} is not a comma list of numbers") from None
    if not values or any(v <= 0 for v in values):
        raise EvalError(f"--{flag}={text!r} must list positive numbers")
    return values


def load(tag: str, flag: str, device, tokenizer, mc: bool):
    """(model, controller or None, meta, directory) of a base checkpoint."""
    directory = resolve_checkpoint_dir("base", tag)
    model, states, meta = build_model(directory, None, device)
    if meta.get("tokenizer") != tokenizer.identity():
        raise EvalError(f"--{flag}: checkpoint {directory} was trained with a different tokenizer")
    if not mc:
        return model, None, meta, directory
    if "mc_config" not in meta:
        raise EvalError(f"--{flag}={tag}: checkpoint {directory} was trained without --mc")
    return model, load_controller(model, states, meta), meta, directory


class Runner:
    """Holds what every task needs: evaluator, generator, filler streams, autocast, progress bar."""

    def __init__(self, cfg: EvalConfig, ev: ArmEvaluator, gen: LongRange, arms, data_dir, tokenizer, device, amp):
        self.cfg, self.ev, self.gen, self.arms = cfg, ev, gen, arms
        self.data_dir, self.tokenizer, self.device, self.amp = data_dir, tokenizer, device, amp
        self.K, self.W, self.E = ev.cfg.block_size, ev.cfg.wc_budget, ev.tail
        self.fillers, self.batches, self.skipped = {}, 0, []
        self.bar = None

    def skip(self, message: str):
        self.skipped.append(message)
        tqdm.write(f"skipped: {message}") if self.bar else print0(f"skipped: {message}")

    def filler(self, n: int):
        """The next val-split filler row of n tokens (None = synthetic filler)."""
        if self.cfg.filler == "synthetic":
            return None
        if n not in self.fillers:
            self.fillers[n] = DataLoader(self.tokenizer, 1, n - 1, self.data_dir, split="val")
        return self.fillers[n].next_rows()[0]

    def run(self, rows, evidence_spans=None, focus_end=None):
        """Arms on rows [B, L+1] (np): x = rows[:, :-1]; evidence_spans: per row [(start, end)] -> {arm: result}.
        Without evidence (natural text, tasks file) the oracle arm has nothing to expand and is left out.
        focus_end: per row, the tokens of history the focus is decided from (the answer's start; default: all
        but the scored tail)."""
        rows = torch.from_numpy(np.ascontiguousarray(rows))
        x, y = rows[:, :-1].to(self.device), rows[:, 1:].to(self.device)
        evidence = None  # [B, L // K] evidence tokens per block
        if evidence_spans is not None:
            evidence = torch.zeros(x.size(0), x.size(1) // self.K)
            for b, spans in enumerate(evidence_spans):
                for s, e in spans:
                    covered = torch.zeros(x.size(1))
                    covered[s:e] = 1
                    evidence[b] += covered.view(-1, self.K).sum(1)
        with self.amp:
            arms = self.arms if evidence is not None else [a for a in self.arms if a != "oracle"]
            ends = None if focus_end is None else torch.tensor(focus_end, device=self.device)
            out = self.ev.run(x, y, arms, evidence, batch_index=self.batches, focus_end=ends)
        self.batches += 1
        self.bar.update(1)
        return out, y[:, -self.E:]

    def span_mask(self, examples, L: int):
        """[B, A, E] bool: answer a of example b covers tail position e (answers outside the tail dropped)."""
        A = max(len(ex.answers) for ex in examples)
        m = torch.zeros(len(examples), A, self.E, dtype=torch.bool)
        for b, ex in enumerate(examples):
            for a, (s, e) in enumerate(ex.answers):
                lo, hi = s - 1 - (L - self.E), e - 1 - (L - self.E)  # row token j is target j-1
                if lo >= 0:
                    m[b, a, lo:hi] = True
        return m.to(self.device)


def answer_starts(examples) -> list:
    """Per example, where its first answer starts: the focus is decided from the history before it."""
    return [min(start for start, _ in ex.answers) for ex in examples]


def needle_expanded(maps, examples, K: int, R: int) -> list:
    """Per example: were all blocks of its needle shown raw by the arm's map (maps [B, n])? None when the needle
    lies in the raw tail (the last R tokens), which every arm shows raw anyway."""
    out = []
    for b, ex in enumerate(examples):
        start, end = ex.evidence[0]
        blocks = range(start // K, (end - 1) // K + 1)
        n = maps.size(1)
        out.append(None if blocks[-1] >= n - R // K else bool((maps[b, blocks[0]:blocks[-1] + 1] == RAW).all()))
    return out


def exact(pred, target, span_mask):
    """[B, A] bool (answer correct) and [B, A] bool (answer present) from [B, E] predictions."""
    hit = (pred == target)[:, None, :] | ~span_mask  # [B, A, E]
    return hit.all(-1) & span_mask.any(-1), span_mask.any(-1)


def needle_rows(cfg: EvalConfig, L: int) -> int:
    """Needle rows per forward pass at history length L: --batch_size, fewer where --batch_tokens says so."""
    return max(1, min(cfg.batch_size, cfg.batch_tokens // L))


def needle_task(r: Runner, plan) -> dict:
    """plan: [(history length L, needles N)]."""
    cfg, K = r.cfg, r.K
    rec = {arm: {"L": [], "depth": [], "offset": [], "correct": [], "expanded": []} for arm in r.arms}
    for L, N in plan:
        n, rows = L + 1, needle_rows(cfg, L)
        if n < r.gen.min_row_len("needle"):
            r.skip(f"needle L={L}: too short for a needle and its query (needs {r.gen.min_row_len('needle') - 1} tokens)")
            r.bar.update(-(-N // rows))
            continue
        rng = np.random.default_rng([cfg.seed, 1, L])
        depths = (np.arange(N) + rng.random(N)) / N  # stratified over [0, 1)
        offsets = rng.integers(0, K, size=N)
        for start in range(0, N, rows):
            idx = range(start, min(N, start + rows))
            exs = [r.gen.needle(np.random.default_rng([cfg.seed, 2, L, i]), n, r.filler(n),
                                None if cfg.needle_decoys < 0 else cfg.needle_decoys, depths[i], int(offsets[i]))
                   for i in idx]
            for arm, res, correct, _ in scored_arms(r, exs, L, f"needle L={L}", start == 0):
                rec[arm]["L"] += [L] * len(exs)
                rec[arm]["depth"] += [e.meta["depth"] for e in exs]
                rec[arm]["offset"] += [e.meta["offset"] for e in exs]
                rec[arm]["correct"] += correct[:, 0].tolist()
                rec[arm]["expanded"] += needle_expanded(res[2], exs, r.K, r.ev.cfg.recent) if len(res) > 2 else [None] * len(exs)
    return rec


def scored_arms(r: Runner, exs, L: int, label: str, first: bool):
    """Run the arms on examples with histories of L tokens, the focus decided before the first answer; yield (arm,
    result, correct [B, A], present [B, A]) for each arm that ran (an arm that skipped is reported once, from the
    first batch, under `label`)."""
    out, target = r.run(np.stack([e.tokens for e in exs]), [e.evidence for e in exs], answer_starts(exs))
    mask = r.span_mask(exs, L)
    for arm, res in out.items():
        if isinstance(res, str):
            r.skip(f"{label} {arm}: {res}") if first else None
            continue
        yield arm, res, *exact(res[1], target, mask)


def answer_accuracy(r: Runner, make, count: int, L: int, label: str, errors) -> dict:
    """{arm: share of answers exactly right} over `count` examples make(i) with histories of L tokens, in batches;
    an exception of `errors` from make skips the rest (one line naming `label`)."""
    totals = {arm: [0, 0] for arm in r.arms}
    for start in range(0, count, r.cfg.batch_size):
        try:
            exs = [make(i) for i in range(start, min(count, start + r.cfg.batch_size))]
        except errors as e:
            r.skip(f"{label}: {e}")
            r.bar.update(-(-(count - start) // r.cfg.batch_size))
            break
        for arm, _, correct, present in scored_arms(r, exs, L, label, start == 0):
            totals[arm][0] += int(correct.sum())
            totals[arm][1] += int(present.sum())
    return {arm: c / t for arm, (c, t) in totals.items() if t}


def recall_task(r: Runner, pairs) -> dict:
    cfg = r.cfg
    L = max(r.K, round(cfg.recall_length * r.W / r.K) * r.K)
    acc = {arm: {} for arm in r.arms}
    for N in pairs:
        make = lambda i: r.gen.recall(np.random.default_rng([cfg.seed, 3, N, i]), L + 1, r.filler(L + 1),  # noqa: E731
                                      n_pairs=N, n_queries=min(4, N), window=r.E)
        for arm, value in answer_accuracy(r, make, cfg.recall_examples, L, f"recall N={N}", DataMixError).items():
            acc[arm][N] = value
    return {"length": L, "accuracy": acc}


def ruler_task(r: Runner, lengths) -> dict:
    """RULER's tasks (nanochat/ruler.py) per history length: the share of answers exactly right, per task and arm."""
    cfg, gen = r.cfg, RulerTasks(r.tokenizer, r.gen)
    acc = {task: {arm: {} for arm in r.arms} for task in RULER_TASKS}
    for t, task in enumerate(RULER_TASKS):
        for L in lengths:
            make = lambda i: gen.example(task, np.random.default_rng([cfg.seed, 6, t, L, i]), L + 1, r.filler(L + 1))  # noqa: E731
            for arm, value in answer_accuracy(r, make, cfg.ruler_examples, L, f"ruler {task} L={L}", ValueError).items():
                acc[task][arm][L] = value
    return {"examples": cfg.ruler_examples, "accuracy": acc}


def loss_tasks(r: Runner, lengths, do_loss: bool, do_subst: bool) -> dict:
    """NLL of the final E tokens per arm and length on natural text and facts docs; substitutability."""
    cfg, E = r.cfg, r.E
    out = {"natural": {a: {} for a in r.arms}, "facts": {a: {} for a in r.arms}, "facts_far": {a: {} for a in r.arms},
           "substitution": {"natural": {}, "facts_far": {}}, "paired": {f"{a} - {b}": {} for a, b in PAIRED}}
    Lmax = max(lengths)
    natural = DataLoader(r.tokenizer, cfg.loss_examples, Lmax, r.data_dir, split="val").next_rows()  # [N, Lmax+1]
    for L in lengths:
        facts_ok = L + 1 >= r.gen.min_row_len("facts")
        subst = do_subst and L <= r.ev.full_max_len and L > r.ev.cfg.recent
        for kind in ("natural", "facts"):
            sums = {}  # name -> [nll sum, count, far nll sum, far count]
            per_text = {}  # arm -> [mean tail NLL of each natural-text row]
            for start in range(0, cfg.loss_examples, cfg.batch_size):
                stop = min(cfg.loss_examples, start + cfg.batch_size)
                if kind == "facts" and not facts_ok:
                    r.bar.update(1)
                    continue
                if kind == "natural":
                    rows, far, spans = natural[start:stop, -(L + 1):], torch.zeros(stop - start, E, dtype=torch.bool), None
                else:
                    exs = [r.gen.facts(np.random.default_rng([cfg.seed, 4, L, i]), L + 1, r.filler(L + 1))
                           for i in range(start, stop)]
                    rows = np.stack([e.tokens for e in exs])
                    far = torch.from_numpy(np.stack([e.mask[-E:] for e in exs]))  # row coordinates = y[:, -E:]
                    spans = [[ev for (a, _), ev in zip(e.answers, e.evidence) if a - 1 >= L - E] for e in exs]
                results = {}
                if do_loss:
                    results, _ = r.run(rows, spans)
                else:
                    r.bar.update(1)
                if subst:
                    results.update(substitution_maps(r, rows, L, full=results.get("full")))
                far = far.to(r.device)
                for name, res in results.items():
                    if isinstance(res, str):
                        r.skip(f"loss {kind} L={L} {name}: {res}") if start == 0 else None
                        continue
                    s = sums.setdefault(name, [0.0, 0, 0.0, 0])
                    s[0] += float(res[0].sum()); s[1] += res[0].numel()  # noqa: E702
                    s[2] += float((res[0] * far).sum()); s[3] += int(far.sum())  # noqa: E702
                    if kind == "natural":
                        per_text.setdefault(name, []).append(res[0].float().mean(1).cpu())
            for a, b in PAIRED:
                if a in per_text and b in per_text:
                    out["paired"][f"{a} - {b}"][L] = paired_difference(torch.cat(per_text[a]), torch.cat(per_text[b]))
            if kind == "facts" and not facts_ok:
                r.skip(f"loss facts L={L}: too short for a facts document (needs {r.gen.min_row_len('facts') - 1} tokens)")
                continue
            for name, (nll, cnt, far_nll, far_cnt) in sums.items():
                if name.startswith("subst_"):
                    key = "natural" if kind == "natural" else "facts_far"
                    value = nll / cnt if kind == "natural" else (far_nll / far_cnt if far_cnt else float("nan"))
                    out["substitution"][key].setdefault(L, {})[name[6:]] = value
                elif kind == "natural":
                    out["natural"][name][L] = nll / cnt
                else:
                    out["facts"][name][L] = nll / cnt
                    out["facts_far"][name][L] = far_nll / far_cnt if far_cnt else float("nan")
    for key in ("natural", "facts", "facts_far", "paired"):
        out[key] = {arm: v for arm, v in out[key].items() if v}
    for table in out["substitution"].values():
        for v in table.values():
            v["delta"] = v["gists"] - v["raw"]
            gap = v["none"] - v["raw"]  # what raw history is worth; too small a gap makes the ratio noise
            v["recovered"] = (v["none"] - v["gists"]) / gap if abs(gap) > 1e-3 else float("nan")
    return out


def paired_difference(a, b) -> dict:
    """Mean and standard error over texts of the per-text difference a - b [N] (the same texts under two arms)."""
    d = (a - b).double()
    se = float(d.std() / d.numel() ** 0.5) if d.numel() > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "texts": d.numel()}


def substitution_maps(r: Runner, rows, L: int, full=None) -> dict:
    """Tail NLL of the MC checkpoint with older blocks raw / as gists (most compressed) / absent. full: the full
    arm's result on these rows, when it ran; within the GPT's trained length all raw is the same forward (longer
    histories are laid out in a compressed rotary frame, mc.positional), so it is not run twice."""
    n, cfg = L // r.K, r.ev.cfg
    maps = {"subst_raw": torch.full((1, n), RAW, dtype=torch.int8),
            "subst_gists": most_compressed_map(n, cfg)[None], "subst_none": none_map(n, cfg)[None]}
    reuse = full is not None and not isinstance(full, str) and L <= r.ev.controller.max_len
    if reuse:
        del maps["subst_raw"]
    rows = torch.from_numpy(np.ascontiguousarray(rows))
    with r.amp:
        out = r.ev.run_maps(rows[:, :-1].to(r.device), rows[:, 1:].to(r.device), {k: v.to(r.device) for k, v in maps.items()})
    return {**out, "subst_raw": full} if reuse else out


def file_task(r: Runner, task_rows) -> dict:
    totals = {arm: [0, 0] for arm in r.arms}
    for rows, answers in batches(task_rows, r.cfg.batch_size):
        L = rows.shape[1] - 1
        out, target = r.run(rows)
        mask = torch.zeros(len(rows), 1, r.E, dtype=torch.bool, device=r.device)
        for b, k in enumerate(answers):
            mask[b, 0, r.E - k:] = True
        for arm, res in out.items():
            if isinstance(res, str):
                r.skip(f"tasks_file L={L} {arm}: {res}")
                continue
            correct, present = exact(res[1], target, mask)
            totals[arm][0] += int(correct.sum())
            totals[arm][1] += int(present.sum())
    return {arm: c / t for arm, (c, t) in totals.items() if t}


def check_flags(cfg: EvalConfig, ev: ArmEvaluator):
    """(tasks, arms, history lengths, recall pair counts, messages about what is left out) from the flags."""
    K, W = ev.cfg.block_size, ev.cfg.wc_budget
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    if unknown := [t for t in tasks if t not in TASKS]:
        raise EvalError(f"--tasks: unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    arms = ev.arms() if cfg.arms == "all" else [a.strip() for a in cfg.arms.split(",") if a.strip()]
    if unknown := [a for a in arms if a not in ARMS]:
        raise EvalError(f"--arms: unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    messages = []
    for arm, flag in (("mean_gist", "--mean_gist_tag"), ("plain_truncation", "--plain_tag"), ("plain_full", "--plain_tag")):
        if arm not in ev.arms():
            messages.append(f"{arm}: skipped (give {flag})")
            arms = [a for a in arms if a != arm]
    if min(cfg.batch_size, cfg.needle_examples, cfg.recall_examples, cfg.ruler_examples, cfg.loss_examples,
           cfg.depth_bins, cfg.offset_bins) < 1:
        raise EvalError("--batch_size, --*_examples, --depth_bins and --offset_bins must be >= 1")
    lengths = sorted({max(K, round(m * W / K) * K) for m in parse_list(cfg.lengths, float, "lengths")})
    if short := [L for L in lengths if L < ev.tail]:
        messages.append(f"lengths {short}: shorter than the scored tail of {ev.tail} tokens")
        lengths = [L for L in lengths if L >= ev.tail]
    if not lengths:
        raise EvalError(f"--lengths={cfg.lengths}: no history length of at least the scored tail ({ev.tail} tokens)")
    far = sorted({max(K, round(m * W / K) * K) for m in parse_list(cfg.far_lengths, float, "far_lengths")}
                 - set(lengths)) if cfg.far_lengths.strip() else []
    plan = [(L, cfg.needle_examples) for L in lengths] + [(L, cfg.far_examples) for L in far]
    return tasks, arms, lengths, plan, parse_list(cfg.recall_pairs, int, "recall_pairs"), messages


def evaluate(cfg: EvalConfig) -> dict:
    _, _, _, _, device = compute_init(cfg.device_type)
    tokenizer = get_tokenizer()
    model, controller, meta, mc_dir = load(cfg.mc_tag, "mc_tag", device, tokenizer, mc=True)
    plain = load(cfg.plain_tag, "plain_tag", device, tokenizer, mc=False)[0] if cfg.plain_tag else None
    mean = load(cfg.mean_gist_tag, "mean_gist_tag", device, tokenizer, mc=True)[1] if cfg.mean_gist_tag else None
    if mean is not None and mean.cfg.gist_type != "mean":
        print0(f"warning: --mean_gist_tag={cfg.mean_gist_tag} was trained with --mc_gist_type={mean.cfg.gist_type}, not mean")
    try:
        ev = ArmEvaluator(controller, plain, mean, cfg.full_max_len, cfg.tail or None, cfg.seed)
    except ValueError as e:
        raise EvalError(str(e)) from None
    mc = controller.cfg
    K, W = mc.block_size, mc.wc_budget
    tasks, arms, lengths, plan, pairs, messages = check_flags(cfg, ev)
    for m in messages:
        print0(m)
    items = load_tasks_file(cfg.tasks_file) if cfg.tasks_file else []
    task_rows = tokenize_items(items, tokenizer, K, ev.tail, cfg.tasks_file)
    trained_on = meta["train_config"]
    data_dir = prepare(cfg.data) if cfg.data else prepare(trained_on["data"], trained_on.get("text_column", "text"))
    gen = LongRange(tokenizer, K)
    amp = autocast_ctx(device.type, autocast_dtype(device.type))
    r = Runner(cfg, ev, gen, arms, data_dir, tokenizer, device, amp)
    r.skipped += messages
    per = lambda n: -(-n // cfg.batch_size)  # noqa: E731
    total = (sum(-(-N // needle_rows(cfg, L)) for L, N in plan) * ("needle" in tasks)
             + len(pairs) * per(cfg.recall_examples) * ("recall" in tasks)
             + len(RULER_TASKS) * len(lengths) * per(cfg.ruler_examples) * ("ruler" in tasks)
             + 2 * len(lengths) * per(cfg.loss_examples) * bool({"loss", "substitution"} & set(tasks))
             + sum(1 for _ in batches(task_rows, cfg.batch_size)))
    r.bar = bar(total=total, desc="mc_eval", dynamic_ncols=True, mininterval=1.0)
    print0(f"mc_eval: {mc_dir.name} step {meta['step']}, W={W}, K={K}, R={mc.recent}, scored tail E={ev.tail}, "
           f"lengths {lengths}, arms {arms}")
    results = {"checkpoint": {"mc": str(mc_dir), "step": meta["step"], "plain": cfg.plain_tag, "mean_gist": cfg.mean_gist_tag},
               "mc_config": asdict(mc), "eval_config": asdict(cfg), "W": W, "K": K, "tail": ev.tail,
               "full_max_len": ev.full_max_len, "arms": arms, "lengths": lengths,
               "needle_lengths": [L for L, _ in plan]}
    if "needle" in tasks:
        results["needle"] = needle_task(r, plan)
    if "recall" in tasks:
        results["recall"] = recall_task(r, pairs)
    if "ruler" in tasks:
        results["ruler"] = ruler_task(r, lengths)
    if {"loss", "substitution"} & set(tasks):
        results["loss"] = loss_tasks(r, lengths, "loss" in tasks, "substitution" in tasks)
    if items:
        results["tasks_file"] = {"path": cfg.tasks_file, "items": len(items), "accuracy": file_task(r, task_rows)}
    r.bar.close()
    results["skipped"] = r.skipped
    return write_outputs(results, get_report_dir())


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, EvalConfig, title="mc_eval")
    cfg = dataclass_from_args(EvalConfig, parser.parse_args(argv))
    try:
        results = evaluate(cfg)
    except (EvalError, TasksFileError, CheckpointError, MCConfigError, DataError, TokenizerError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print0(f"wrote {get_report_dir() / 'mc_eval.json'}")
    return results


if __name__ == "__main__":
    main()
