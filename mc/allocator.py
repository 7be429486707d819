"""The focus allocator: LensNet scores -> legal, budgeted, block-aligned edits of LOD maps (docs/architecture.md §5).

Scores live on working-context entries; edits live on units of the map:
    expand a LOD1 gist  (block GIST -> RAW)        +K-1 entries, scored by the gist's entry
    expand a LOD2 gist  (group GROUP -> GIST)      +K-1 entries, scored by the group's entry
    collapse a raw block (RAW -> GIST)             -(K-1), scored by the mean of its tokens' scores
    collapse K gists    (GIST x K -> GROUP)        -(K-1), scored by the mean of their scores
Positive scores ask for detail, negative ones for compression. Because every edit costs the same
K-1 entries, "within budget" is a count: one iteration applies the most negative collapses (below
-collapse_threshold), then as many of the best expansions (above expand_threshold) as the freed
budget affords, at most `max_edits` of each. `greedy` takes the top scores; `stochastic_greedy`
samples without replacement among the top-k with probabilities softmax(score / temperature)
(Gumbel top-k). Everything is vectorised over variants and blocks.

Inference (evaluation's mc arm, sessions) decides the focus by selection instead (`focus_maps`): LensNet
scores every old block as a LOD1 gist (`MCController.block_scores`), the best blocks are shown raw, each beside
the gist of the node that covers it or in place of its own LOD1 gist, as many as fit W, and the budget left
opens the nodes above them, best block first. A raw block costs K entries however deep in the tree it lies, so
the layout does not depend on the history's length. LensNet never has to rank a LOD2 gist (a 1,024-token summary
it cannot judge). With `read_on` (the default) each block in the ranking is followed by the block after it
(`read_on_scores`): the answer to a question usually continues past the words that match it, into the next
block. Before that, `recency_bonus` favours the block right before the raw tail (`recency_scores`): it is shown
unless LensNet is clearly surer of another, so text with no question reads on from its recent words.

Evaluation baselines build maps directly: `gists_only` (the most compressed map: nothing expanded),
`random` (working_context.random_maps), `similarity` (scores = cosine of each gist with the mean of
the tail, then greedy) and `oracle` (`oracle_maps`: the blocks it is told hold the answer, selected as
`focus_maps` selects).
"""

import torch
import torch.nn.functional as F

from mc.config import MCConfig
from mc.working_context import (GIST, GROUP, RAW, _group_view, collapse_blocks, collapse_groups, edit_cost,
                                entry_counts, expand_blocks, expand_groups, max_level, most_compressed_map, open_nodes,
                                tail_mask)

NEG = float("-inf")


def unit_scores(scores, wc, K: int):
    """Entry scores [V, W] -> per-unit scores: (gist block [V, n], group [V, G], raw block mean [V, n], gist group mean [V, G]).

    Units with no entry of the right kind get NaN.
    """
    V, n = wc.lod_map.shape
    G = -(-n // K)
    block = (wc.pos // K).clamp(max=n)  # [V, W]; position >= n*K (partial block) -> overflow column n
    group = (wc.pos // (K * K)).clamp(max=G)
    scores = scores.float()

    def scatter_mean(index, select, width):
        total = torch.zeros(V, width + 1, device=scores.device)
        count = torch.zeros(V, width + 1, device=scores.device)
        index = torch.where(select, index, width)
        total.scatter_add_(1, index, torch.where(select, scores, 0.0))
        count.scatter_add_(1, index, select.float())
        return (total / count)[:, :width]  # NaN where count == 0

    gist_block = scatter_mean(block, wc.valid & (wc.lod == 1), n)
    group_entry = scatter_mean(group, wc.valid & (wc.lod == 2), G)
    raw_block = scatter_mean(block, wc.valid & (wc.lod == 0), n)
    gist_group = scatter_mean(group, wc.valid & (wc.lod == 1), G)
    return gist_block, group_entry, raw_block, gist_group


def select_top(keys, n_take, top_k: int | None = None):
    """Mask [V, N] of the n_take [V] largest finite keys per row (only among the top_k when given)."""
    V, N = keys.shape
    order = keys.argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=keys.device).expand(V, N))
    return torch.isfinite(keys) & (rank < n_take[:, None])


def choose(scores, n_take, cfg: MCConfig, policy: str, generator=None):
    """Pick up to n_take [V] candidates (finite entries of scores [V, N]) by `policy`."""
    if policy == "greedy":
        return select_top(scores, n_take)
    if policy != "stochastic_greedy":
        raise ValueError(f"unknown allocator policy {policy!r}")
    in_top_k = select_top(scores, torch.full_like(n_take, cfg.top_k))
    u = torch.rand(scores.shape, generator=generator, device=scores.device).clamp_(1e-9, 1 - 1e-9)
    keys = torch.where(in_top_k, scores / cfg.temperature - torch.log(-torch.log(u)), NEG)
    return select_top(keys, n_take)


def edit_maps(lod_map, scores, wc, cfg: MCConfig, policy: str, generator=None, tail_tokens: int = 0,
              allow_collapse: bool = True):
    """One allocator iteration on maps [V, n_blocks] given entry scores [V, W] of their WCs; returns new maps."""
    K, W = cfg.block_size, cfg.wc_budget
    cost = edit_cost(K)
    V, n = lod_map.shape
    G = n // K  # complete groups (collapses)
    recent_blocks = min(cfg.recent // K, n)
    gist_block, group_entry, raw_block, gist_group = unit_scores(scores, wc, K)
    max_edits = torch.full((V,), cfg.max_edits, dtype=torch.long, device=lod_map.device)
    new_map = lod_map
    if allow_collapse:
        block_idx = torch.arange(n, device=lod_map.device)
        collapsible = (lod_map == RAW) & (block_idx < n - recent_blocks) & (raw_block < -cfg.collapse_threshold)
        collapse_block = select_top(torch.where(collapsible, -raw_block, NEG), max_edits)
        new_map = collapse_blocks(new_map, collapse_block, recent_blocks)
        if G:
            all_gist = (new_map[:, :G * K] == GIST).view(V, G, K).all(-1)
            mean = gist_group[:, :G]
            collapsible = all_gist & (mean < -cfg.collapse_threshold)
            new_map = collapse_groups(new_map, select_top(torch.where(collapsible, -mean, NEG), max_edits), K)
    free = (W - entry_counts(new_map, K, tail_tokens)).clamp(min=0)
    n_afford = torch.minimum(free // cost, max_edits)
    expand_block = (lod_map == GIST) & (new_map == GIST) & (gist_block > cfg.expand_threshold)
    candidates = [torch.where(expand_block, gist_block, NEG)]
    if n:  # LOD2 groups, a partial one included (a group's first block is LOD2)
        is_group = _group_view(new_map == GROUP, K)[..., 0]  # [V, ceil(n / K)]
        expand_group = is_group & (group_entry > cfg.expand_threshold)
        candidates.append(torch.where(expand_group, group_entry, NEG))
    picked = choose(torch.cat(candidates, 1), n_afford, cfg, policy, generator)
    new_map = expand_blocks(new_map, picked[:, :n])
    if len(candidates) > 1:
        new_map = expand_groups(new_map, picked[:, n:], K)
    return new_map


def expanded_units(lod_map, base_map, K: int):
    """Which units of `base_map` are shown in more detail in `lod_map` (both [V, n]) -> (blocks [V, n], LOD2 groups
    [V, ceil(n / K)], a partial group included)."""
    blocks = (base_map == GIST) & (lod_map == RAW)
    groups = _group_view((base_map == GROUP) & (lod_map != GROUP), K).any(-1)
    return blocks, groups


def similarity_scores(wc, tail_len: int, visible=None):
    """Cosine of every entry with the mean of the last tail_len visible entries (the query; visible [V, W], default
    the valid ones): [V, W]."""
    tail = tail_mask(wc.valid if visible is None else visible, tail_len).unsqueeze(-1)  # [V, W, 1]
    query = (wc.embeds.float() * tail).sum(1) / tail.sum(1).clamp(min=1)  # [V, D]
    sim = F.cosine_similarity(wc.embeds.float(), query[:, None, :], dim=-1)
    return torch.where(wc.valid & (wc.lod > 0), sim, 0.0)


def overlap_block_scores(tokens, K: int, tail_len: int, vocab: int):
    """[B, n] per complete block of tokens [B, T] (ids < vocab): how much of its text recurs in the last
    tail_len tokens, each shared token weighted by 1 / (its count in the row), so rare words (names,
    numbers) dominate and template words ("the", "is") barely count. The lexical-overlap teacher of
    training (runtime.py)."""
    B, T = tokens.shape
    counts = torch.zeros(B, vocab, device=tokens.device).scatter_add_(1, tokens, torch.ones(B, T, device=tokens.device))
    in_tail = torch.zeros(B, vocab, dtype=torch.bool, device=tokens.device).scatter_(1, tokens[:, -tail_len:], True)
    weight = in_tail.gather(1, tokens).float() / counts.gather(1, tokens)  # [B, T]
    n = T // K
    return weight[:, :n * K].view(B, n, K).sum(-1)


def block_entry_scores(block_scores, wc, K: int):
    """Per-block scores [V, n] -> entry scores [V, W] that `edit_maps` reads: a LOD1 gist gets its block's
    score, a gist of level l >= 2 the best of the blocks it covers (wc.lod_map), raw entries and padding 0."""
    V, n = block_scores.shape
    best = block_scores  # [V, n] best score of the entry holding each block
    for level in range(2, max_level(n, K) + 1):
        size = K ** (level - 1)
        shown = wc.lod_map == level
        node_best = _group_view(torch.where(shown, block_scores, NEG), size).amax(-1)  # [V, ceil(n / size)]
        best = torch.where(shown, node_best.repeat_interleave(size, 1)[:, :n], best)
    scores = best.gather(1, (wc.pos // K).clamp(max=max(n - 1, 0))) if n else torch.zeros_like(wc.pos, dtype=best.dtype)
    return torch.where(wc.valid & (wc.lod > 0), scores, 0.0)


def read_on_scores(block_scores):
    """Block scores [V, n] where every scored block b+1 ranks at least just below block b (the next float down):
    a block expanded for the question brings the text that continues it. Needles that cross a block boundary
    are found by their key's block and answered from the next one; without it (CPU preset, 8W, 400 needles)
    the mc arm found the key's block of needles starting at offsets 16-23 (96 % and 70 %) but showed the next
    block for only 25-46 % of them (exact match .33-.39 there, .77 overall; with it .90). Blocks without a score
    (-inf) stay so."""
    prev = F.pad(block_scores[:, :-1], (1, 0), value=NEG)
    below = torch.nextafter(prev, torch.full_like(prev, NEG))
    return torch.where(block_scores > NEG, torch.maximum(block_scores, below), block_scores)


def recency_scores(block_scores, bonus: float):
    """Block scores [V, n] with `bonus` added to each row's most recent scored block (right before the raw tail)."""
    if block_scores.size(1) == 0:
        return block_scores
    scored = block_scores > NEG
    last = (scored * torch.arange(1, block_scores.size(1) + 1, device=block_scores.device)).argmax(1, keepdim=True)  # [V, 1]
    return block_scores.scatter_add(1, last, torch.full_like(last, bonus, dtype=block_scores.dtype))


def ranking_scores(block_scores, cfg: MCConfig):
    """The scores the inference focus ranks blocks by: LensNet's, with the recency bonus, then read-on."""
    if cfg.recency_bonus:
        block_scores = recency_scores(block_scores, cfg.recency_bonus)
    return read_on_scores(block_scores) if cfg.read_on else block_scores


def _take_prefix(maps, top, pending, budget, K: int):
    """Maps [V, n] with the longest prefix of the pending ranked blocks (top [V, k], pending [V, k]) shown raw that
    fits budget [V] more entries: a block costs K-1 where its LOD1 gist is shown, else K (beside a coarser gist).
    Returns (maps, taken [V, k])."""
    cost = torch.where(maps.gather(1, top) == GIST, K - 1, K)
    taken = pending & (torch.where(pending, cost, 0).cumsum(1) <= budget[:, None])
    shown = torch.zeros_like(maps, dtype=torch.bool).scatter(1, top, taken)
    return torch.where(shown, RAW, maps), taken


def focus_maps(base_map, block_scores, cfg: MCConfig, tail_tokens: int = 0, ranking: bool = True, reserve: int = 0):
    """Maps [V, n] grown from base_map [V, n] (a most compressed map) by showing blocks raw in the order of
    block_scores [V, n] (-inf: never; `ranking_scores` applied when `ranking`), then opening the nodes above them.

    1. selection: the longest prefix of the ranking that fits W, a block shown raw beside the gist of the node
       that covers it (K entries) or in place of its LOD1 gist (K-1), so a block costs the same however deep
       in the history it lies;
    2. context: best pick first, every node above the pick is opened (`open_nodes`) where the whole map then
       still fits W, so the picks' neighbours are shown as LOD1 gists when the budget allows;
    3. selection again: the ranking goes on where step 1 stopped, at the costs of the opened map (a block whose
       LOD1 gist is now shown costs K-1), so below K²+R tokens the focus shows what a tiling of opened nodes would.
    Steps 2 and 3 leave `reserve` entries free: a session keeps room for the rest of its partial block, so the
    block's growth does not push the map over W (and the context it opened closed again) before the next refocus.
    Only the first budget // (K-1) + 1 blocks of the ranking are looked at (a top-k, not a sort of the history)."""
    K, W = cfg.block_size, cfg.wc_budget
    if ranking:
        block_scores = ranking_scores(block_scores, cfg)
    V, n = base_map.shape
    maps = base_map.long()
    budget = W - entry_counts(maps, K, tail_tokens)  # [V]
    candidate = (maps >= GIST) & (block_scores > NEG)  # [V, n]
    k = min(n, max(int(budget.max()), 0) // (K - 1) + 1)
    if k == 0:
        return base_map
    top = torch.where(candidate, block_scores, NEG).topk(k, dim=1).indices  # [V, k] best first
    pending = candidate.gather(1, top)
    maps, taken = _take_prefix(maps, top, pending, budget, K)
    for i in range(k):  # k <= W / (K-1) + 1 picks, each vectorised over V
        pick = torch.zeros_like(candidate).scatter(1, top[:, i:i + 1], taken[:, i:i + 1])
        opened = open_nodes(maps, pick, K)
        fits = entry_counts(opened, K, tail_tokens) + reserve <= W
        maps = torch.where(fits[:, None], opened, maps)
    maps, _ = _take_prefix(maps, top, pending & ~taken, W - reserve - entry_counts(maps, K, tail_tokens), K)
    return maps.to(base_map.dtype)


def oracle_maps(n_blocks: int, cfg: MCConfig, evidence, tail_tokens: int = 0):
    """Most compressed maps [V, n] with the blocks holding evidence (evidence [V, n]: evidence tokens per block)
    shown raw, more evidence first, as many as fit W (`focus_maps` without read-on or recency bonus)."""
    base = most_compressed_map(n_blocks, cfg, tail_tokens, evidence.device).expand(evidence.size(0), n_blocks)
    order = torch.arange(n_blocks, device=evidence.device) / (n_blocks + 1)  # ties: the earlier block first
    keys = torch.where(evidence > 0, evidence.float() - order, NEG)
    return focus_maps(base, keys, cfg, tail_tokens, ranking=False)
