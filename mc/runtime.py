"""MCController: one MegaContext training step over a micro-batch (DESIGN.md section 8). Orchestration only.

Per micro-batch x, y [B, T] (history T > W):
 1. tree: LOD0 = wte(x), LOD1/LOD2 gists by one batched GistNet call per level (differentiable);
 2. base WC per sequence = the most compressed cover; LensNet scores its entries (with grad);
 3. V = B (1 + N) working contexts, sequence-major: per sequence the truncation baseline (last W
    raw tokens) and N compressed variants that all start from the base and only expand:
    `teacher_variants` focused by the lexical-overlap teacher (greedy on the blocks whose rare
    tokens recur in the raw tail, mc.allocator.overlap_block_scores), half of the rest
    LensNet-guided (stochastic_greedy over the detached scores, `allocator_iterations` rounds,
    re-scored in between), the others random legal maps. The teacher is exploration, not a
    shortcut: without it the block holding a needle is expanded in ~1 variant in n, so neither the
    GPT (copying from an expanded block) nor LensNet (which block was worth it) sees the signal.
    It is never used at inference, where LensNet alone decides;
 4. one batched GPT forward over [V, W] with inputs_embeds + per-row rope, per-position loss;
 5. LM loss = weighted mean over all LOD0 targets of all variants (baseline weight configurable);
 6. LensNet loss from measured counterfactuals: every variant of a sequence ends in the same raw
    tail, so the NLL of the last H targets is comparable across them. A variant's utility under
    LensNet is the sum of the base scores of the units it expanded; a pairwise logistic loss,
    weighted by |delta NLL|, pushes the utility of the variant with lower NLL above the other's.
    This is a real, non-zero signal whenever variants differ, and it reaches only LensNet.
Errors raise; there is no fallback to vanilla training.
"""

import dataclasses

import torch
import torch.nn.functional as F

from mc.allocator import block_entry_scores, expanded_units, overlap_block_scores, refocus, unit_scores
from mc.config import MCConfig
from mc.lensnet import tail_mask
from mc.positional import wc_rope
from mc.telemetry import PhaseTimer
from mc.tree import build_tree
from mc.working_context import RAW, UNCOVERED, materialize, most_compressed_map, random_maps

ARMS = ("truncation", "mc", "full")  # the three validation arms at budget W


def truncation_map(n_blocks: int, cfg: MCConfig, device=None):
    """[n_blocks] int8: the last W // K blocks raw, everything before uncovered (the truncation arm)."""
    keep = min(cfg.wc_budget // cfg.block_size, n_blocks)
    b = torch.arange(n_blocks, device=device)
    return torch.where(b >= n_blocks - keep, RAW, UNCOVERED).to(torch.int8)


def rel_pos(wc):
    """Tokens between each entry's start and the end of the history, [V, W] float."""
    return (wc.history_len - wc.pos).float()


def pairwise_lens_loss(utility, nll):
    """Pairwise logistic loss over the variants of each sequence, weighted by |delta NLL|.

    utility, nll [B, N]: for each pair (i, j) with nll_i < nll_j, utility_i should exceed utility_j.
    Returns (loss, fraction of pairs LensNet already orders correctly).
    """
    du = utility[:, :, None] - utility[:, None, :]  # [B, N, N] u_i - u_j
    dn = (nll[:, None, :] - nll[:, :, None]).detach()  # nll_j - nll_i > 0: i is better
    weight = dn.abs()
    weight = weight / weight.mean().clamp(min=1e-8)
    loss = (weight * F.softplus(-du * dn.sign())).mean()
    decided = dn != 0
    accuracy = ((du * dn) > 0)[decided].float().mean() if decided.any() else torch.zeros((), device=nll.device)
    return loss, accuracy


@dataclasses.dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to backpropagate: LM loss + weight x LensNet loss
    metrics: dict  # floats for logging
    timings: dict  # seconds per phase


class MCController:
    """Owns the MegaContext nets and turns a micro-batch into a loss (training) or three-arm NLLs (validation)."""

    def __init__(self, model, gistnet, lensnet, cfg: MCConfig, rank: int = 0):
        cfg.validate(model.config.sequence_len, model.config.head_dim)
        self.model, self.gistnet, self.lensnet, self.cfg = model, gistnet, lensnet, cfg
        self.rank = rank
        self.timer = PhaseTimer(model.lm_head.weight.device)

    def modules(self) -> dict:
        return {"mc_gist": self.gistnet, "mc_lens": self.lensnet}

    def _generator(self, step: int, device):
        """Variant sampling RNG, a pure function of (seed, rank, step) so --resume replays it exactly."""
        seed = (self.cfg.seed * 1_000_003 + self.rank * 10_007 + step) % 2**62
        return torch.Generator(device=device).manual_seed(seed)

    def score(self, wc, grad: bool = True):
        """LensNet scores [V, W] of working contexts (embeddings detached: LensNet never trains the tree)."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self.lensnet(wc.embeds.detach(), wc.lod, rel_pos(wc), wc.valid, tail_len=self.cfg.recent)

    def guided_maps(self, base_map, base_scores, levels, x, next_token, sample, policy, generator, block_scores=None):
        """Maps grown from base_map [V, n] by the allocator; LensNet re-scores between iterations, or, given
        block_scores [V, n] (the teacher), every iteration reads those."""
        detached = [level.detach() for level in levels]
        maps, scores = base_map, base_scores.detach()
        for it in range(self.cfg.allocator_iterations):
            wc = materialize(maps, detached, x, self.cfg, next_token, sample)
            if block_scores is not None:
                scores = block_entry_scores(block_scores, wc, self.cfg.block_size)
            elif it > 0:
                with torch.no_grad():
                    scores = self.score(wc, grad=False)
            maps = refocus(maps, scores, wc, self.cfg, policy, generator, allow_collapse=False)
        return maps

    def forward_wc(self, wc, forward_fn=None):
        """Per-position loss [V, W] of the GPT over materialised working contexts."""
        cos, sin = wc_rope(wc.pos, wc.span, wc.lod, wc.valid, self.model.config.head_dim, self.cfg.positional)
        forward_fn = forward_fn or self.model
        return forward_fn(inputs_embeds=wc.embeds, rope=(cos, sin), targets=wc.targets, loss_reduction="none")

    def process_batch(self, x, y, step: int, forward_fn=None) -> StepOutput:
        cfg, K, N = self.cfg, self.cfg.block_size, self.cfg.num_variants
        B, T = x.shape
        n = T // K
        device = x.device
        generator = self._generator(step, device)
        next_token = y[:, -1]
        timer = self.timer
        with timer.phase("tree"):
            levels = build_tree(self.model.transformer.wte(x), self.gistnet, cfg)
        with timer.phase("lensnet"):
            base_map = most_compressed_map(n, cfg, device=device).expand(B, n)
            base_wc = materialize(base_map, [level.detach() for level in levels], x, cfg, next_token)
            base_scores = self.score(base_wc)  # [B, W], with grad into LensNet
        with timer.phase("allocator"):
            n_teacher = cfg.teacher_variants
            n_guided = (N - n_teacher) // 2
            n_random = N - n_teacher - n_guided
            seq = torch.arange(B, device=device)
            overlap = overlap_block_scores(x, K, cfg.recent, self.model.config.vocab_size)  # [B, n]
            teacher = self.guided_maps(base_map.repeat_interleave(n_teacher, 0),
                                       base_scores.repeat_interleave(n_teacher, 0), levels, x, next_token,
                                       seq.repeat_interleave(n_teacher), "greedy", None,
                                       overlap.repeat_interleave(n_teacher, 0))
            guided = self.guided_maps(base_map.repeat_interleave(n_guided, 0),
                                      base_scores.repeat_interleave(n_guided, 0), levels, x, next_token,
                                      seq.repeat_interleave(n_guided), cfg.allocator, generator)
            randoms = random_maps(B * n_random, n, cfg, generator, device=device)
            variants = torch.cat([teacher.view(B, n_teacher, n), guided.view(B, n_guided, n),
                                  randoms.view(B, n_random, n)], 1)  # [B, N, n]
            maps = torch.cat([truncation_map(n, cfg, device).expand(B, 1, n), variants], 1).view(-1, n)  # [V, n]
        with timer.phase("wc_build"):
            wc = materialize(maps, levels, x, cfg, next_token)  # sequence-major: sample = v // (1 + N)
        with timer.phase("forward"):
            per_pos = self.forward_wc(wc, forward_fn)  # [V, W]
        with timer.phase("losses"):
            lod0 = (wc.targets >= 0).float()
            weight = torch.ones(B, 1 + N, device=device)
            weight[:, 0] = cfg.baseline_loss_weight
            weight = weight.view(-1, 1) * lod0  # [V, W]
            lm_loss = (per_pos * weight).sum() / weight.sum().clamp(min=1)
            shared = tail_mask(wc.valid, cfg.horizon).float()  # [V, W] the last H targets, same for all variants
            nll_h = ((per_pos.detach() * shared).sum(1) / cfg.horizon).view(B, 1 + N)  # [B, 1 + N]
            blocks, groups = expanded_units(variants.view(B * N, n), base_map.repeat_interleave(N, 0), K)
            gist_block, group_entry, _, _ = unit_scores(base_scores, base_wc, K)
            G = groups.size(1)
            gist_block = gist_block.nan_to_num(0.0).repeat_interleave(N, 0)
            group_entry = group_entry[:, :G].nan_to_num(0.0).repeat_interleave(N, 0)
            utility = ((gist_block * blocks).sum(1) + (group_entry * groups).sum(1)).view(B, N)
            lens_loss, lens_acc = pairwise_lens_loss(utility, nll_h[:, 1:])
            loss = lm_loss + cfg.lens_loss_weight * lens_loss
        metrics = self._metrics(lm_loss, lens_loss, lens_acc, nll_h, wc, blocks, groups, base_scores)
        return StepOutput(loss, metrics, timer.pop())

    def _metrics(self, lm_loss, lens_loss, lens_acc, nll_h, wc, blocks, groups, base_scores) -> dict:
        """Every logged number in one host transfer."""
        dnll = nll_h[:, 1:] - nll_h[:, 1:].mean(1, keepdim=True)
        valid = wc.valid.float()
        lod_share = [((wc.lod == level).float() * valid).sum() / valid.sum() for level in range(self.cfg.max_lod + 1)]
        values = torch.stack([
            lm_loss.detach(), lens_loss.detach(), lens_acc, nll_h[:, 0].mean(), nll_h[:, 1:].mean(),
            nll_h[:, 1:].min(1).values.mean(), dnll.abs().mean(), dnll.std(), (blocks.sum(1) + groups.sum(1)).float().mean(),
            wc.n_entries.float().mean(), base_scores.detach().std(), *lod_share,
        ]).float().tolist()
        names = ["lm_loss", "lens_loss", "lens_pair_acc", "nll_h_truncation", "nll_h_variants", "nll_h_best",
                 "dnll_abs", "dnll_std", "expansions", "wc_entries", "lens_score_std",
                 *[f"lod{level}_share" for level in range(self.cfg.max_lod + 1)]]
        metrics = dict(zip(names, values))
        metrics["variants_per_sample"] = 1 + self.cfg.num_variants
        metrics["wc_batch"] = wc.valid.size(0)
        return metrics

    @torch.no_grad()
    def evaluate_arms(self, x, y):
        """NLL [B, H] of the final H targets under truncation (last W tokens), MC (greedy LensNet focus) and full history."""
        cfg, H, W = self.cfg, self.cfg.horizon, self.cfg.wc_budget
        B, T = x.shape
        n = T // cfg.block_size
        full = self.model(x, y, loss_reduction="none")[:, -H:]
        truncation = self.model(x[:, -W:], y[:, -W:], loss_reduction="none")[:, -H:]
        levels = build_tree(self.model.transformer.wte(x), self.gistnet, cfg)
        next_token = y[:, -1]
        base_map = most_compressed_map(n, cfg, device=x.device).expand(B, n)
        base_wc = materialize(base_map, levels, x, cfg, next_token)
        maps = self.guided_maps(base_map, self.score(base_wc, grad=False), levels, x, next_token, None, "greedy", None)
        wc = materialize(maps, levels, x, cfg, next_token)
        per_pos = self.forward_wc(wc)
        mc = per_pos[tail_mask(wc.valid, H)].view(B, H)
        return {"truncation": truncation, "mc": mc, "full": full}

    @torch.no_grad()
    def arms_bpb(self, batches, steps: int, token_bytes, autocast_ctx) -> dict:
        """Bits per byte of the final H tokens under the three arms, over `steps` (x, y) batches (summed over ranks)."""
        import math
        import torch.distributed as dist
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
            nats += torch.stack([(arms[arm].float() * counted).sum() for arm in ARMS]).double()
            total_bytes += nbytes.sum()
        if dist.is_initialized():
            dist.all_reduce(nats)
            dist.all_reduce(total_bytes)
        bpb = (nats / (math.log(2) * total_bytes.clamp(min=1))).tolist()
        return dict(zip(ARMS, bpb))
