"""MCController: one MegaContext training step over a micro-batch (docs/architecture.md §8). Orchestration only.

Per micro-batch x, y [B, T] (history T > W):
 1. tree: LOD0 = wte(x), LOD1/LOD2 gists by one batched GistNet call per level (differentiable);
 2. base WC per sequence = the most compressed cover without partial nodes (`lens_base_map`); LensNet scores
    its entries (with grad; with cfg.lens_match each LOD1 gist plus its block's question match, mc/lensnet.py),
    reading only the history before the scored targets (`focus_ends`: up to the first
    answer among the last H targets, else up to the last H targets), as it would at inference, where the
    answer is not yet known;
 3. V = B (1 + N) working contexts, sequence-major: per sequence the truncation baseline (last W
    raw tokens) and N compressed variants that all start from the base and only expand:
    `teacher_variants` focused by the lexical-overlap teacher (greedy on the blocks whose rare
    tokens recur in the raw tail, mc.allocator.overlap_block_scores), half of the rest
    LensNet-guided (stochastic_greedy over the detached scores, `allocator_iterations` rounds,
    re-scored in between), the others random legal maps. The teacher is exploration, not a
    shortcut: without it the block holding a needle is expanded in ~1 variant in n, so neither the
    GPT (copying from an expanded block) nor LensNet (which block was worth it) sees the signal.
    It is never used at inference, where LensNet alone decides (by selection: `focus` scores every
    old block as a LOD1 gist and shows the best raw, mc.allocator.focus_maps).
    With cfg.partial_gists every variant then shows a partial node as one gist where it expanded nothing
    under it (`close_partial_nodes`), as the inference focus from the partial cover would;
 4. one batched GPT forward over [V, W] with inputs_embeds + per-row rope, per-position loss;
 5. LM loss = weighted mean over all LOD0 targets of all variants (baseline weight configurable;
    optional per-target weights, e.g. answers of long-range rows counted more); optionally
    (`--history_lm_weight`) plus an LM loss over every target of the history in W-token windows, so
    the GPT learns from as many targets per row as a plain model (`history_lm_loss`); optionally
    (`--mc_bag_loss_weight`) plus GistNet's bag-of-tokens loss (mc.gistnet: gists keep rare tokens);
 6. LensNet loss from measured counterfactuals: every variant of a sequence ends in the same raw
    tail, so the NLL of the last H targets is comparable across them. The units the best variant
    expanded are the targets of a softmax over LensNet's scores of all expandable units, weighted by
    that variant's gain over the mean (`best_variant_lens_loss`). It reaches only LensNet. (Measured
    with the GPT and GistNet frozen, needle rows at T=1024, W=128, 200 steps of 16: top-1 hit rate of
    the needle's block 0.78 / 0.78 / 0.69 at 256 / 512 / 1024 tokens, as with direct supervision by the
    needle's position, 0.80 / 0.78 / 0.66; the pairwise loss over summed variant scores that this
    replaced left it near chance in 300 full training steps.)
Errors raise; there is no fallback to vanilla training.
"""

import math
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mc.allocator import NEG, block_entry_scores, edit_maps, expanded_units, focus_maps, overlap_block_scores, unit_scores
from mc.config import MCConfig
from mc.positional import wc_rope
from mc.telemetry import PhaseTimer
from mc.tree import build_tree, partial_nodes
from mc.working_context import (WorkingContext, close_partial_nodes, entry_token_ids, materialize, most_compressed_map,
                                random_maps, tail_mask, take_rows, truncation_map)
from nanochat.longrange import weighted_mean

FOCUS_POLICIES = ("mc", "gists_only", "random")  # MCController.focus
VALIDATION_ARMS = ("truncation", "mc", "full")  # the arms of training-time validation at budget W (mc/arms.py: evaluation)
NEG_LOGIT = -1e9  # the score of a unit LensNet cannot expand


def rel_pos(wc):
    """Tokens between each entry's start and the end of the history, [V, W] float."""
    return (wc.history_len - wc.pos).float()


def focus_ends(answers, horizon: int):
    """[B] tokens of history LensNet may read when it decides the focus of rows x [B, T]: everything up to the
    input of the first answer target among the last H targets (answers [B, T] bool over the targets y; the
    answers of earlier queries or of an earlier packed example are history), or, where none of the last H
    is an answer, up to the input of the first of them. The focus is decided before what it is judged on."""
    T = answers.shape[1]
    scored = answers[:, T - horizon:]  # [B, H]
    first = T - horizon + torch.where(scored.any(1), scored.float().argmax(1), 0)  # [B] first scored answer
    return first + 1


def visible_entries(wc, focus_end=None):
    """[V, W] bool: the entries of wc that LensNet reads, i.e. the valid ones that end by focus_end [B] (None: all)."""
    if focus_end is None:
        return wc.valid
    return wc.valid & (wc.pos + wc.span <= focus_end.to(wc.pos.device)[wc.sample][:, None])


def lens_base_map(n_blocks: int, cfg: MCConfig, device=None):
    """The map [n_blocks] LensNet scores in training and the teacher's and LensNet's variants grow from: the most
    compressed cover, with partial nodes shown as their complete children. Inference scores every old block as
    a LOD1 gist (`MCController.block_scores`); a partial node would be a single unit covering all of them, and
    a softmax over one unit has no loss (on a probe with cfg.partial_gists, LensNet's loss stayed 0)."""
    return most_compressed_map(n_blocks, replace(cfg, partial_gists=False), device=device)


def best_variant_lens_loss(unit_scores, expanded, nll):
    """LensNet's loss from measured counterfactuals (self-imitation of the best of N).

    For each sequence, the units (LOD1 gist blocks, LOD2 groups) that its best variant (lowest NLL on the
    shared last H targets) expanded are the targets of a softmax over LensNet's scores of every unit it
    could expand, weighted by how much better that variant did than the mean of the variants: where focus
    made no difference (most natural text) a sequence barely counts; where one expansion made a needle
    copyable it dominates. Every unit's score gets a gradient (the winners up, all others down), which
    teaches ranking much faster than comparing the summed scores of two variants' expansions.
    unit_scores [B, U] (NaN: the base WC has no such unit), expanded [B, N, U] bool, nll [B, N].
    Returns (loss, hit rate: in the sequences where the best variant did better than the mean, LensNet's top
    unit is one it expanded).
    """
    B, N, U = expanded.shape
    available = ~unit_scores.isnan()
    logits = unit_scores.nan_to_num(0.0).masked_fill(~available, NEG_LOGIT)  # [B, U]
    target = expanded[torch.arange(B, device=nll.device), nll.argmin(1)] & available  # [B, U]
    has = target.any(1)  # [B]
    gain = (nll.mean(1) - nll.min(1).values).detach() * has  # [B] >= 0
    weight = gain / gain.sum().clamp(min=1e-8)
    nll_target = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~target, NEG_LOGIT), 1)  # [B]
    loss = (weight * torch.where(has, nll_target, 0.0)).sum()
    decided = gain > 0
    hit = target.gather(1, logits.argmax(1, keepdim=True))[:, 0] & decided
    return loss, hit.float().sum() / decided.sum().clamp(min=1)


class StepOutput(NamedTuple):
    """A micro-batch's training step, the shape of a plain model's (`loss, metrics = ...`); the seconds of its
    phases stay in the controller's timer (`timer.pop()`), so a backward pass timed there joins them."""
    loss: torch.Tensor  # scalar to backpropagate: LM loss + weight x LensNet loss
    metrics: dict  # floats for logging, among them lm_loss


class MCController:
    """Owns the MegaContext nets and turns a micro-batch into a loss (training) or three-arm NLLs (validation)."""

    def __init__(self, model, gistnet, lensnet, cfg: MCConfig, rank: int = 0):
        cfg.validate(model.config.sequence_len, model.config.head_dim)
        self.model, self.gistnet, self.lensnet, self.cfg = model, gistnet, lensnet, cfg
        self.max_len = cfg.rope_max_len(model.config.sequence_len)  # rotary distances in a WC stay below it
        self.rank = rank
        self.timer = PhaseTimer(model.lm_head.weight.device)

    def modules(self) -> dict:
        return {"mc_gist": self.gistnet, "mc_lens": self.lensnet}

    def optimizer_split(self) -> tuple[list, list]:
        """(nets whose matrices Muon trains, nets AdamW trains whole), by cfg.gist_optimizer."""
        if self.cfg.gist_optimizer == "adamw":
            return [self.lensnet], [self.gistnet]
        return [self.gistnet, self.lensnet], []

    def _generator(self, step: int, device):
        """Variant sampling RNG, a pure function of (seed, rank, step) so --resume replays it exactly."""
        seed = (self.cfg.seed * 1_000_003 + self.rank * 10_007 + step) % 2**62
        return torch.Generator(device=device).manual_seed(seed)

    def score(self, wc, grad: bool = True, focus_end=None, match=None):
        """LensNet scores [V, W] of working contexts (embeddings detached: LensNet never trains the tree), reading
        only the entries that end by focus_end [B] (see `focus_ends`; None: all); hidden entries score 0.
        match [B, n] (`question_match`, with cfg.lens_match) is added to the score of each LOD1 gist's block.
        LensNet reads only the columns up to the last visible entry: later ones are padding, which no visible entry
        attends to (training's base working contexts at the CPU preset fill 33-63 of W = 128 columns)."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            visible = visible_entries(wc, focus_end)
            width = int(visible.any(0).cumsum(0).argmax()) + 1  # after the last column with a visible entry: none
            read = self.lensnet(wc.embeds[:, :width].detach(), wc.lod[:, :width], rel_pos(wc)[:, :width],
                                visible[:, :width], tail_len=self.cfg.recent)
            scores = F.pad(read, (0, visible.size(1) - width))  # [V, W], hidden entries 0
            if match is None:
                return scores
            block = (wc.pos // self.cfg.block_size).clamp(max=match.size(1) - 1)  # [V, W]
            return scores + torch.where(visible & (wc.lod == 1), match[wc.sample[:, None], block], 0.0)

    def question_match(self, lod0, focus_end=None):
        """LensNet's question match [B, n] of every block of histories with token embeddings lod0 [B, T, D] (detached
        here), the question being the R tokens before focus_end [B]; None without cfg.lens_match."""
        return self.lensnet.match(lod0.detach(), focus_end) if self.cfg.lens_match else None

    def block_scores(self, levels, focus_end=None, block_order=None):
        """LensNet's score [B, n] of every block older than the raw tail, read as a LOD1 gist (-inf: the raw
        tail, and blocks ending after focus_end [B]); block_order [B, n] (mc.arms' shuffled arm): block i gets the
        question match of block block_order[b, i], as it got that block's gist. The blocks are scored in windows of at most W - raw
        gists followed by the raw tail (the WCs LensNet trains on), all windows of all rows in one batch,
        so the cost grows linearly with the history. levels: the tree's [LOD0 [B, T, D], LOD1 [B, n, D], ...]."""
        K = self.cfg.block_size
        lod0, lod1 = levels[0], levels[1]
        B, T, D = lod0.shape
        n, device = lod1.size(1), lod0.device
        older = n - min(self.cfg.recent // K, n)  # blocks before the raw tail
        raw = T - older * K  # raw tail tokens (with the partial block)
        per = max(self.cfg.wc_budget - raw, 1)  # gists per window (W - raw is 0 only when W = R + K - 1, full partial block)
        C, width = max(1, -(-older // per)), raw + per  # windows, entries per window
        j = torch.arange(width, device=device)
        first = torch.arange(C, device=device)[:, None] * per  # [C, 1] first block of each window
        gists = (older - first).clamp(0, per)  # [C, 1]
        is_gist, is_tail = j < gists, (j >= gists) & (j < gists + raw)  # [C, width]
        block = (first + j).clamp(max=max(n - 1, 0))  # [C, width]
        pos = torch.where(is_gist, block * K, (older * K + j - gists).clamp(0, T - 1))  # [C, width]
        rows = lambda t: t.expand(B, C, width).reshape(B * C, width)  # noqa: E731  the windows of every row
        valid = rows(is_gist | is_tail)
        embeds = torch.where(is_gist[..., None], lod1[:, block], lod0[:, pos]).reshape(B * C, width, D)
        wc = WorkingContext(torch.where(valid[..., None], embeds, 0.0), rows(pos), rows(torch.where(is_gist, K, 1)),
                            rows(is_gist.long()), torch.full((B * C, width), -1, device=device), valid,
                            torch.arange(B, device=device).repeat_interleave(C), None, T)
        with torch.no_grad():
            match = self.question_match(lod0, focus_end)
        if match is not None and block_order is not None:
            match = match.gather(1, block_order)
        scores = self.score(wc, grad=False, focus_end=focus_end, match=match)  # [B * C, width]
        readable = visible_entries(wc, focus_end) & (wc.lod == 1)
        column = torch.where(readable, wc.pos // K, n).view(B, C * width)  # column n collects the rest
        out = torch.full((B, n + 1), NEG, device=device)
        return out.scatter_reduce(1, column, torch.where(readable, scores, NEG).view(B, C * width), "amax")[:, :n]

    def tree(self, x):
        """The tree [LOD0 [B, L, D], LOD1 [B, L/K, D], ...] of histories x [B, L], differentiable."""
        return build_tree(self.model.transformer.wte(x), self.gistnet, self.cfg)

    def focus(self, levels, *, policy: str = "mc", focus_end=None, tail_tokens: int = 0, generator=None, block_order=None):
        """The LOD maps [B, n] a focus policy shows of a tree; validation, evaluation and sessions decide every
        focus here (training grows its variants from the same cover, partial nodes opened: `lens_base_map`):
        `mc` the inference focus: the most compressed map, then LensNet's best blocks (read up to focus_end
        [B]; block_order: see `block_scores`) shown raw, then the nodes above them opened, within W (`select`);
        `gists_only` the most compressed map; `random` random legal maps (generator)."""
        B, n, device = levels[0].size(0), levels[1].size(1), levels[0].device
        if policy not in FOCUS_POLICIES:
            raise ValueError(f"unknown focus policy {policy!r}; known: {', '.join(FOCUS_POLICIES)}")
        if policy == "random":
            return random_maps(B, n, self.cfg, generator, device=device)
        if policy == "gists_only":
            return most_compressed_map(n, self.cfg, tail_tokens, device=device).expand(B, n)
        return self.select(self.block_scores(levels, focus_end, block_order), tail_tokens)

    def select(self, block_scores, tail_tokens: int = 0, cfg: MCConfig | None = None, reserve: int = 0):
        """The `mc` focus from LensNet's block scores [B, n]: from the most compressed map, the best blocks shown
        raw and the nodes above them opened, within W (`mc.allocator.focus_maps`; cfg overrides self.cfg, e.g. an
        arm without read-on). Sessions call it with the scores they keep and a reserve for their partial block."""
        cfg = cfg or self.cfg
        B, n = block_scores.shape
        base = most_compressed_map(n, cfg, tail_tokens, device=block_scores.device).expand(B, n)
        return focus_maps(base, block_scores, cfg, tail_tokens, reserve=reserve)

    def guided_maps(self, base_map, base_scores, levels, x, next_token, sample, *, policy, generator=None,
                    block_scores=None, focus_end=None, match=None):
        """Maps grown from base_map [V, n] by the allocator; LensNet re-scores between iterations (reading up to
        focus_end [B], question match [B, n]), or, given block_scores [V, n] (the teacher), every iteration reads those."""
        detached = [level.detach() for level in levels]
        maps, scores = base_map, base_scores.detach()
        for it in range(self.cfg.allocator_iterations):
            wc = materialize(maps, detached, x, self.cfg, next_token, sample)
            if block_scores is not None:
                scores = block_entry_scores(block_scores, wc, self.cfg.block_size)
            elif it > 0:
                with torch.no_grad():
                    scores = self.score(wc, grad=False, focus_end=focus_end,
                                        match=None if match is None else match.detach())
            maps = edit_maps(maps, scores, wc, self.cfg, policy, generator, allow_collapse=False)
        return maps

    def rope(self, wc, frame=None):
        """Rotary tables (cos, sin) of materialised WCs (mc.positional.wc_rope), distances kept below max_len;
        frame [V]: the rows' frames (default: each row's own)."""
        return wc_rope(wc.pos, wc.span, wc.lod, wc.valid, self.model.config.head_dim, self.cfg.positional,
                       max_len=self.max_len, frame=frame)

    def forward_wc(self, wc, x, forward_fn=None):
        """Per-position loss [V, W] of the GPT over materialised working contexts of histories x [B, T]."""
        forward_fn = self.model if forward_fn is None else forward_fn  # a compiled model has no truth value
        return forward_fn(inputs_embeds=wc.embeds, token_ids=entry_token_ids(wc.pos, wc.lod, x, wc.valid, wc.sample),
                          rope=self.rope(wc), targets=wc.targets, loss_reduction="none")

    def tail_logits(self, wc, x, n: int, forward_fn=None):
        """Logits [V, n, vocab] of the last n entries of materialised WCs of histories x (the raw tail): the GPT's last
        block and head run only over the slots from the earliest of them on (logits_to_keep)."""
        forward_fn = self.model if forward_fn is None else forward_fn
        tail = tail_mask(wc.valid, n)  # [V, W]
        keep = wc.valid.size(1) - int(tail.float().argmax(1).min())  # slots from the earliest tail entry on
        logits = forward_fn(inputs_embeds=wc.embeds, token_ids=entry_token_ids(wc.pos, wc.lod, x, wc.valid, wc.sample),
                            rope=self.rope(wc), logits_to_keep=keep)  # [V, keep, vocab]
        return logits[tail[:, -keep:]].view(wc.valid.size(0), n, -1)

    def history_lm_loss(self, x, y, weights=None, forward_fn=None):
        """LM loss over every target of the micro-batch, read in windows of W raw tokens ([B·T/W, W], standard
        RoPE; the oldest T mod W tokens are left out): the GPT then learns from all T targets of a row, as a
        plain model does, not only from the entries of its working contexts. Returns (loss, the per-target loss
        [B, W] of each row's last window), the latter being what the truncation baseline's working context computes."""
        W = self.cfg.wc_budget
        start = x.size(1) % W  # histories are longer than W (MCConfig.validate)
        forward_fn = self.model if forward_fn is None else forward_fn
        per_pos = forward_fn(x[:, start:].reshape(-1, W), y[:, start:].reshape(-1, W), loss_reduction="none")
        loss = weighted_mean(per_pos.view(x.size(0), -1), y[:, start:], None if weights is None else weights[:, start:])
        return loss, per_pos.view(x.size(0), -1, W)[:, -1]

    def process_batch(self, x, y, step: int, forward_fn=None, answers=None, weights=None,
                      history_lm_weight: float = 0.0) -> StepOutput:
        """answers [B, T] bool (optional) marks answer targets (long-range rows): LensNet decides the focus before
        the first of them among the last H targets (`focus_ends`); weights [B, T] (optional) weigh the targets in the LM loss;
        history_lm_weight > 0 adds that much of `history_lm_loss`. With the GPT and GistNet frozen (a focus phase)
        the LM loss trains nothing: the GPT's last block and head then run over the last H entries alone, and the
        LM loss (logged only) is theirs (the CPU preset's 64 working contexts: 536 -> 264 ms of GPT forward, eager)."""
        cfg, K, N = self.cfg, self.cfg.block_size, self.cfg.num_variants
        B, T = x.shape
        n = T // K
        device = x.device
        generator = self._generator(step, device)
        next_token = y[:, -1]
        answers = torch.zeros_like(x, dtype=torch.bool) if answers is None else answers
        focus_end = focus_ends(answers, cfg.horizon)  # [B]
        timer = self.timer
        with timer.phase("tree"):
            levels = self.tree(x)
        with timer.phase("lensnet"):
            base_map = lens_base_map(n, cfg, device).expand(B, n)
            base_wc = materialize(base_map, [level.detach() for level in levels], x, cfg, next_token)
            match = self.question_match(levels[0], focus_end)  # [B, n] or None
            base_scores = self.score(base_wc, focus_end=focus_end, match=match)  # [B, W], with grad into LensNet
        with timer.phase("allocator"):
            n_teacher = cfg.teacher_variants
            n_guided = (N - n_teacher) // 2
            n_random = N - n_teacher - n_guided
            seq = torch.arange(B, device=device)
            overlap = overlap_block_scores(x, K, cfg.recent, self.model.config.vocab_size)  # [B, n]
            teacher = self.guided_maps(base_map.repeat_interleave(n_teacher, 0),
                                       base_scores.repeat_interleave(n_teacher, 0), levels, x, next_token,
                                       seq.repeat_interleave(n_teacher), policy="greedy",
                                       block_scores=overlap.repeat_interleave(n_teacher, 0))
            guided = self.guided_maps(base_map.repeat_interleave(n_guided, 0),
                                      base_scores.repeat_interleave(n_guided, 0), levels, x, next_token,
                                      seq.repeat_interleave(n_guided), policy=cfg.allocator, generator=generator,
                                      focus_end=focus_end, match=match)
            randoms = random_maps(B * n_random, n, cfg, generator, device=device)
            variants = torch.cat([teacher.view(B, n_teacher, n), guided.view(B, n_guided, n),
                                  randoms.view(B, n_random, n)], 1)  # [B, N, n]
            variants = close_partial_nodes(variants.view(B * N, n), partial_nodes(n, cfg), K).view(B, N, n)
            maps = torch.cat([truncation_map(n, cfg, device).expand(B, 1, n), variants], 1).view(-1, n)  # [V, n]
        with timer.phase("wc_build"):
            wc = materialize(maps, levels, x, cfg, next_token)  # sequence-major: sample = v // (1 + N)
        shared = tail_mask(wc.valid, cfg.horizon)  # [V, W] the last H targets, same for all variants
        lm_trains = any(p.requires_grad for net in (self.model, self.gistnet) for p in net.parameters())
        history_lm = None
        with timer.phase("forward"):
            if lm_trains and history_lm_weight > 0:  # the history's last window is the truncation baseline: run once
                history_lm, baseline = self.history_lm_loss(x, y, weights, forward_fn)
                compressed = torch.arange(wc.valid.size(0), device=device) % (1 + N) > 0
                per_variant = self.forward_wc(take_rows(wc, compressed), x, forward_fn).view(B, N, -1)
                per_pos = torch.cat([baseline[:, None], per_variant], 1).flatten(0, 1)  # [V, W]
            elif lm_trains:
                per_pos = self.forward_wc(wc, x, forward_fn)  # [V, W]
            else:  # GPT and GistNet frozen (a focus phase): LensNet's loss reads the last H targets alone
                logits = self.tail_logits(wc, x, cfg.horizon, forward_fn)  # [V, H, vocab]
                per_pos = torch.zeros(wc.targets.shape, device=device)
                per_pos[shared] = F.cross_entropy(logits.float().flatten(0, 1), wc.targets[shared], ignore_index=-1,
                                                  reduction="none")
        with timer.phase("losses"):
            counted = (wc.targets >= 0) if lm_trains else (wc.targets >= 0) & shared  # frozen: the last H targets
            weight = torch.ones(B, 1 + N, device=device)
            weight[:, 0] = cfg.baseline_loss_weight
            weight = weight.view(-1, 1) * counted  # [V, W]
            if weights is not None:
                weight = weight * weights[wc.sample[:, None], wc.pos]  # an entry at p has target y[p]
            lm_loss = (per_pos * weight).sum() / weight.sum().clamp(min=1)
            nll_h = ((per_pos.detach() * shared).sum(1) / cfg.horizon).view(B, 1 + N)  # [B, 1 + N]
            blocks, groups = expanded_units(variants.view(B * N, n), base_map.repeat_interleave(N, 0), K)
            gist_block, group_entry, _, _ = unit_scores(base_scores, base_wc, K)
            G = groups.size(1)
            units = torch.cat([gist_block, group_entry[:, :G]], 1)  # [B, n + G] scores of the expandable units
            expanded = torch.cat([blocks, groups], 1).view(B, N, n + G)
            lens_loss, lens_hit = best_variant_lens_loss(units, expanded, nll_h[:, 1:])
            loss = lm_loss + cfg.lens_loss_weight * lens_loss
            if history_lm is not None:
                loss = loss + history_lm_weight * history_lm
            bag = self.gistnet.bag_loss(levels, x) if cfg.bag_loss_weight > 0 else None
            if bag is not None:
                loss = loss + cfg.bag_loss_weight * bag
        extra = {"history_lm_loss": history_lm, "bag_loss": bag}
        metrics = self._metrics(lm_loss, lens_loss, lens_hit, nll_h, wc, blocks, groups, base_scores,
                                {k: v for k, v in extra.items() if v is not None})
        return StepOutput(loss, metrics)

    def _metrics(self, lm_loss, lens_loss, lens_hit, nll_h, wc, blocks, groups, base_scores, extra: dict) -> dict:
        """Every logged number in one host transfer."""
        dnll = nll_h[:, 1:] - nll_h[:, 1:].mean(1, keepdim=True)
        valid = wc.valid.float()
        lod_share = [((wc.lod == level).float() * valid).sum() / valid.sum() for level in range(self.cfg.max_lod + 1)]
        values = torch.stack([
            lm_loss.detach(), lens_loss.detach(), lens_hit, nll_h[:, 0].mean(), nll_h[:, 1:].mean(),
            nll_h[:, 1:].min(1).values.mean(), dnll.abs().mean(), dnll.std(), (blocks.sum(1) + groups.sum(1)).float().mean(),
            wc.n_entries.float().mean(), base_scores.detach().std(), *lod_share,
            *[v.detach() for v in extra.values()],
        ]).float().tolist()
        names = ["lm_loss", "lens_loss", "lens_hit", "nll_h_truncation", "nll_h_variants", "nll_h_best",
                 "dnll_abs", "dnll_std", "expansions", "wc_entries", "lens_score_std",
                 *[f"lod{level}_share" for level in range(self.cfg.max_lod + 1)],
                 *extra]
        metrics = dict(zip(names, values))
        metrics["variants_per_sample"] = 1 + self.cfg.num_variants
        metrics["wc_batch"] = wc.valid.size(0)
        return metrics

    @torch.no_grad()
    def evaluate_arms(self, x, y):
        """NLL [B, H] of the final H targets under truncation (last W tokens), MC (the inference focus, `focus`)
        and full history."""
        cfg, H, W = self.cfg, self.cfg.horizon, self.cfg.wc_budget
        B = x.size(0)
        full = self.model(x, y, loss_reduction="none")[:, -H:]
        truncation = self.model(x[:, -W:], y[:, -W:], loss_reduction="none")[:, -H:]
        levels = self.tree(x)
        next_token = y[:, -1]
        maps = self.focus(levels, focus_end=focus_ends(torch.zeros_like(x, dtype=torch.bool), H))
        wc = materialize(maps, levels, x, cfg, next_token)
        per_pos = self.forward_wc(wc, x)
        mc = per_pos[tail_mask(wc.valid, H)].view(B, H)
        return {"truncation": truncation, "mc": mc, "full": full}

    @torch.no_grad()
    def arms_bpb(self, batches, steps: int, token_bytes, autocast_ctx) -> dict:
        """Bits per byte of the final H tokens under the three arms, over `steps` (x, y) batches (summed over ranks)."""
        H = self.cfg.horizon
        device = token_bytes.device
        nats = torch.zeros(3, dtype=torch.float64, device=device)
        total_bytes = torch.zeros((), dtype=torch.float64, device=device)
        for _ in range(steps):
            x, y = next(batches)
            with autocast_ctx:
                arms = self.evaluate_arms(x, y)
            nbytes = token_bytes[y[:, -H:]]
            counted = (nbytes > 0).float()
            nats += torch.stack([(arms[arm].float() * counted).sum() for arm in VALIDATION_ARMS]).double()
            total_bytes += nbytes.sum()
        if dist.is_initialized():
            dist.all_reduce(nats)
            dist.all_reduce(total_bytes)
        bpb = (nats / (math.log(2) * total_bytes.clamp(min=1))).tolist()
        return dict(zip(VALIDATION_ARMS, bpb))
