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

Inference (evaluation's mc arm, sessions) decides the focus by descent instead (`descend_maps`): LensNet
scores every old block as a LOD1 gist (`MCController.block_scores`), and the best blocks are expanded
together with their LOD2 groups, best first, as many as fit W. LensNet then never has to judge a LOD2
gist (a 1,024-token summary it cannot rank: the greedy policy found the needle's block at 9·W–16·W in
4–24 % of rows at the CPU preset, descent in 33–43 %, mc exact match 0.08–0.38 -> 0.66–0.71). Below
K²+R tokens (no LOD2 group) descent and one greedy iteration without an edit cap coincide. With
`read_on` (the default) each block in the ranking is followed by the block after it (`read_on_scores`):
the answer to a question usually continues past the words that match it, into the next block. Before
that, `recency_bonus` favours the block right before the raw tail (`recency_scores`): it is shown unless LensNet
is clearly surer of another, so text with no question reads on from its recent words.

Evaluation baselines build maps directly: `gists_only` (the most compressed map: nothing expanded),
`random` (working_context.random_maps), `similarity` (scores = cosine of each gist with the mean of
the tail, then greedy) and `oracle` (expands the blocks it is told hold the answer).
"""

from dataclasses import replace

import torch
import torch.nn.functional as F

from mc.config import MCConfig
from mc.tree import boundary, partial_nodes, shown_end
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


def descend_maps(base_map, block_scores, cfg: MCConfig, tail_tokens: int = 0):
    """Maps [V, n] grown from base_map [V, n] (a most compressed map) by expanding blocks in the order of
    block_scores [V, n] (-inf: never), each with the nodes above it (`open_nodes`), while the total fits W.
    A block costs K-1 (GIST -> RAW) plus, for each node above it that no earlier pick opened, that node's
    children - 1 (K-1 for a complete node, j-1 for the tree's partial node of j children); the picks are the
    longest prefix of the ranking that fits, among the blocks that would fit alone (deep in a long history,
    opening every node above a block can cost more than W leaves). Every pick costs at least K-1, so only
    the first budget // (K-1) + 1 blocks of the ranking are looked at (a top-k, not a sort of the history).
    The ranking is `ranking_scores`: the recency bonus, then (cfg.read_on) each block followed by its successor."""
    K = cfg.block_size
    block_scores = ranking_scores(block_scores, cfg)
    V, n = base_map.shape
    device = base_map.device
    lod = base_map.long()
    budget = cfg.wc_budget - entry_counts(base_map, K, tail_tokens)  # [V]
    partial = partial_nodes(n, cfg)
    alone = (K - 1) * lod.clamp(min=1)  # [V, n] K-1 per node above the block (all complete), plus the block
    for level, g, j in partial:  # the shown partial node has j children, not K
        start = g * K ** (level - 1)
        run = alone[:, start:start + j * K ** (level - 2)]
        run -= (K - j) * (lod[:, start:start + run.size(1)] == level)
    candidate = (lod >= GIST) & (block_scores > NEG) & (alone <= budget[:, None])  # [V, n]
    k = min(n, max(int(budget.max()), 0) // (K - 1) + 1)
    top = torch.where(candidate, block_scores, NEG).topk(k, dim=1).indices  # [V, k] best first
    lod_t, cand_t = lod.gather(1, top), candidate.gather(1, top)  # [V, k]
    earlier = torch.arange(k, device=device)[:, None] > torch.arange(k, device=device)[None, :]  # [k, k] col before row
    cost = torch.full_like(top, K - 1)
    sizes = {level: (g, j) for level, g, j in partial}
    for level in range(2, max_level(n, K) + 1):  # the level-`level` node above each pick: opened by the first pick
        node = top // K ** (level - 1)  # [V, k]
        above = cand_t & (lod_t >= level)
        shared = ((node[:, :, None] == node[:, None, :]) & above[:, None, :] & earlier).any(-1)  # an earlier pick opened it
        g, j = sizes.get(level, (-1, K))
        children = torch.where((lod_t == level) & (node == g), j, K)
        cost = cost + torch.where(above & ~shared, children - 1, 0)
    spent = torch.where(cand_t, cost, 0).cumsum(1)  # [V, k] along the ranking
    take = cand_t & (spent <= budget[:, None])
    chosen = torch.zeros_like(candidate).scatter(1, top, take)  # [V, n]
    return expand_blocks(open_nodes(base_map, chosen, K), chosen)


def fixed_prefix(n_blocks: int, cfg: MCConfig, tail_tokens: int = 0) -> tuple[int, int]:
    """(start, entries): `descend_maps` from the most compressed map of n_blocks blocks leaves blocks [0, start)
    as that map shows them (`entries` entries): opening any node there down to one raw block costs more than the
    budget the map leaves (its `alone` cost). `start` is where a run of the map's nodes of one level begins, so
    [start, n) is a history of its own (aligned nodes, the same partial nodes below that level): descending it
    with W less `entries` gives the full map's suffix. Host arithmetic, O(log_K n); (0, 0) when the map drops
    history. A session at 1M tokens (W=128, K=32) descends ~530 of its 31,250 blocks this way."""
    K, older = cfg.block_size, boundary(n_blocks, cfg)
    top = max_level(n_blocks, K)
    runs, end, entries = [], 0, 0  # runs [(start, level, alone cost, entries)], oldest first
    for level in range(top, 0, -1):
        size = K ** (level - 1)
        complete = older // size * size
        if complete > end:
            runs.append((end, level, (K - 1) * level, (complete - end) // size))
            end = complete
        shown = shown_end(n_blocks, level, cfg)
        if shown > end:  # the partial node of this level: j children, j - 1 entries to open it
            j = (shown - end) // K ** (level - 2)
            runs.append((end, level, (K - 1) * (level - 1) + j - 1, 1))
            end = shown
    budget = cfg.wc_budget - (n_blocks - older) * K - tail_tokens - sum(r[3] for r in runs)
    if budget < 0:
        return 0, 0
    for start, _, alone, count in runs:
        if alone <= budget:
            return start, entries
        entries += count
    return older, entries


def descend_suffix(block_scores, cfg: MCConfig, tail_tokens: int = 0):
    """(start, maps [V, n - start]): `descend_maps` from the most compressed map, computed only for the blocks it can
    change (`fixed_prefix`; blocks [0, start) keep the most compressed map), at O(n - start) tensor work, so a
    session's refocus does not grow with its history. Equal to the full descent's blocks [start, n) (up to the order
    `topk` gives exactly tied scores)."""
    V, n = block_scores.shape
    start, entries = fixed_prefix(n, cfg, tail_tokens)
    if start:
        scores = block_scores[:, start - 1:]  # one block before: read-on ranks block `start` right behind it
        block_scores = ranking_scores(scores, cfg)[:, 1:]
        cfg = replace(cfg, wc_budget=cfg.wc_budget - entries, read_on=False, recency_bonus=0.0)
    base = most_compressed_map(n - start, cfg, tail_tokens, device=block_scores.device).expand(V, n - start)
    return start, descend_maps(base, block_scores, cfg, tail_tokens)


def oracle_map(n_blocks: int, cfg: MCConfig, answer_blocks, tail_tokens: int = 0):
    """Most compressed maps [V, n] with the given blocks [V, n] bool (and the nodes above them) expanded."""
    K = cfg.block_size
    V = answer_blocks.size(0)
    lod_map = most_compressed_map(n_blocks, cfg, tail_tokens, answer_blocks.device).expand(V, n_blocks)
    lod_map = open_nodes(lod_map, answer_blocks, K)
    lod_map = expand_blocks(lod_map, answer_blocks & (lod_map == GIST))
    over = entry_counts(lod_map, K, tail_tokens) > cfg.wc_budget
    if over.any():
        raise ValueError(f"oracle: expanding the answer blocks exceeds --mc_wc_budget={cfg.wc_budget}")
    return lod_map
