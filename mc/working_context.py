"""Working contexts: cuts through the MegaContext tree, kept as per-block LOD maps (docs/architecture.md §4).

A history of `T` tokens has `n_blocks = T // K` complete LOD1 blocks and `t = T % K` tokens of a
partial block after them. A working context (WC) over that history is described by its LOD map

    lod_map  # [V, n_blocks] int8, one row per variant, one column per complete LOD1 block
      RAW       =  0  the block is shown as its K raw tokens (K entries): in place of its LOD1 gist, or, when
                      the smallest node holding it is shown as one gist (its other blocks hold that
                      node's level l >= 2), beside that gist, which stays (the block's tokens follow it)
      GIST      =  1  the block is shown as its LOD1 gist (1 entry)
      l >= 2          the block is part of a LOD-l node shown as ONE entry (its gist): the node's blocks
                      (all K^(l-1) of an aligned complete node, or the complete children of a partial
                      node, mc.tree) are all l. GROUP = 2 names the LOD2 level.
      UNCOVERED = -1  the block is not shown; only a prefix of the history may be uncovered, and
                      only when even the most compressed cover does not fit the budget W

The tree grows as deep as the history needs, so maps have no highest level. The partial block (if any)
is always raw and is not part of the map. The last `recent_blocks = R // K` complete blocks are RAW, so
the last R tokens (the raw tail, partial block included) are always tokens. A map is legal (`is_legal`)
when each of its nodes is a node of the tree (`node_violations`), its uncovered blocks form a prefix
and its tail is raw; it fits when `entry_counts <= W`. Raw blocks beside a coarse gist are what let a
working context show any block of any history raw for K entries, whatever the depth of the tree there.

Edits (the focus allocator's vocabulary) change one block or one node: `expand_blocks` (GIST -> RAW,
+K-1), `expand_groups` (LOD2 -> GIST, +K-1 for a complete group, +j-1 for a partial one of j blocks),
`open_nodes` (every node holding a marked block, down to LOD1 gists), `open_partial_nodes` (partial nodes
whose gists the tree replaced -> their children), `close_partial_nodes` (a partial node's children, all shown
as gists -> the node), `collapse_blocks` (RAW -> GIST,
-(K-1), never in the raw tail), `collapse_groups` (K GIST blocks of a complete group -> LOD2, -(K-1)).
Group masks are `[V, ceil(n_blocks / K)]`; an entry at position p belongs to block p // K and group
p // K**2. Budgets are the caller's business.

`materialize` turns maps into tensors the GPT can read: a slot grid of two slots per token position
(a gist whose node starts there, then the raw token) marks the slots holding an entry, a cumsum compacts those slots to the left
of a `[V, W]` grid (right padding), and ONE gather from the concatenated level tensors builds the
embeddings. Targets come from positions (an LOD0 entry at p predicts token p+1), never from index
alignment. `validate_wc` is the one place that checks the five invariants of a materialised batch.
"""

import dataclasses

import torch

from mc.config import MCConfig
from mc.tree import level_rows, shown_end

UNCOVERED, RAW, GIST, GROUP = -1, 0, 1, 2  # values of an LOD map (GROUP: the LOD2 level; deeper levels are 3, 4, ...)


def edit_cost(K: int) -> int:
    """Entries one expansion adds (or one collapse frees): a block of K tokens vs 1 gist, a group of K gists vs 1."""
    return K - 1


def _group_view(mask, K: int):
    """[V, n_blocks] -> [V, ceil(n_blocks / K), K], padding the last incomplete group with False."""
    V, n = mask.shape
    G = -(-n // K)
    pad = torch.zeros(V, G * K - n, dtype=mask.dtype, device=mask.device)
    return torch.cat([mask, pad], dim=1).view(V, G, K)


def _blocks_of_groups(group_mask, n_blocks: int, K: int):
    """[V, G] -> [V, n_blocks]: a block is marked when its group is (G may be n_blocks // K or ceil)."""
    blocks = group_mask.repeat_interleave(K, dim=1)[:, :n_blocks]
    pad = torch.zeros(blocks.size(0), n_blocks - blocks.size(1), dtype=blocks.dtype, device=blocks.device)
    return torch.cat([blocks, pad], dim=1)


def node_sum(mask, size: int):
    """Per-block count of marked blocks [V, n] in the aligned node of `size` blocks holding each block."""
    return _group_view(mask.long(), size).sum(-1).repeat_interleave(size, dim=1)[:, :mask.size(1)]


def max_level(n_blocks: int, K: int) -> int:
    """An upper bound on the levels a map of n_blocks blocks can hold (a LOD-l node needs K^(l-2) blocks)."""
    level = 1
    while K ** (level - 1) <= n_blocks:
        level += 1
    return level


# ---------------------------------------------------------------------------------------------
# counting and legality of LOD maps

def shown_nodes(lod_map, K: int, level: int):
    """[V, ceil(n / K^(level-1))] bool: the aligned nodes of `level` (>= 1) shown as one gist (a block of theirs
    holds `level`; the others are `level` too, or RAW blocks shown beside the gist)."""
    return _group_view(lod_map == level, K ** (level - 1)).any(-1)


def entry_counts(lod_map, K: int, tail_tokens: int = 0):
    """Entries of each WC [V]: K per RAW block, 1 per shown gist of any level, plus the partial-block tokens."""
    lod = lod_map.long()
    count = (lod == RAW).sum(1) * K + tail_tokens
    for level in range(1, max_level(lod.size(1), K) + 1):
        count = count + shown_nodes(lod, K, level).sum(1)
    return count


def gist_starts(lod_map, K: int):
    """[V, n] long: the level of the gist entry that starts at each block (0: none), i.e. the block begins an
    aligned node of that level shown as one gist."""
    lod = lod_map.long()
    V, n = lod.shape
    b = torch.arange(n, device=lod.device)
    start = torch.zeros_like(lod)
    for level in range(1, max_level(n, K) + 1):
        size = K ** (level - 1)
        begins = shown_nodes(lod, K, level).repeat_interleave(size, dim=1)[:, :n] & (b % size == 0)
        start = torch.where(begins, level, start)
    return start


def node_violations(lod_map, cfg: MCConfig, level: int):
    """[V, n] bool: the blocks at `level` (>= 2) whose node is not a node of the tree: its `level` blocks, with the
    RAW blocks beside its gist, are not all the blocks of an aligned complete node older than the raw tail, nor
    exactly the children of the tree's partial node."""
    lod = lod_map.long()
    n = lod.size(1)
    size = cfg.block_size ** (level - 1)
    mask = lod == level
    allowed = (torch.arange(n, device=lod.device) < shown_end(n, level, cfg)).expand_as(mask)
    member = mask | ((lod == RAW) & allowed & (node_sum(mask, size) > 0))  # RAW blocks beside the node's gist
    return mask & (~allowed | (node_sum(member, size) != node_sum(allowed, size)))


def is_legal(lod_map, K: int, recent_blocks: int, max_lod: int | None = None, partial: bool = False):
    """bool [V]: known values only (at most max_lod, when given), every node of level >= 2 a node of the tree
    (complete and aligned, or the partial node of its level when `partial`), UNCOVERED only as a prefix, the
    last `recent_blocks` blocks RAW. (The budget is checked separately with `entry_counts`.)"""
    lod = lod_map.long()
    V, n = lod.shape
    cfg = MCConfig(block_size=K, recent=recent_blocks * K, wc_budget=(recent_blocks + 2) * K, partial_gists=partial)
    top = max_level(n, K)
    ok = ((lod >= UNCOVERED) & (lod <= (top if max_lod is None else min(max_lod, top)))).all(1)
    uncovered = lod == UNCOVERED
    ok &= ~(uncovered[:, 1:] & ~uncovered[:, :-1]).any(1)  # covered block followed by an uncovered one
    for level in range(2, top + 1):
        ok &= ~node_violations(lod, cfg, level).any(1)
    r = min(recent_blocks, n)
    if r:
        ok &= (lod[:, n - r:] == RAW).all(1)
    return ok


# ---------------------------------------------------------------------------------------------
# edits (vectorised over variants, blocks and groups)

def expand_blocks(lod_map, block_mask):
    """GIST blocks marked in block_mask [V, n_blocks] become RAW (+K-1 entries each); others unchanged."""
    return torch.where(block_mask & (lod_map == GIST), RAW, lod_map).to(lod_map.dtype)


def expand_groups(lod_map, group_mask, K: int):
    """GROUP groups marked in group_mask [V, G] become K GIST blocks (+K-1 entries each)."""
    blocks = _blocks_of_groups(group_mask, lod_map.size(1), K)
    return torch.where(blocks & (lod_map == GROUP), GIST, lod_map).to(lod_map.dtype)


def open_nodes(lod_map, block_mask, K: int):
    """Every shown node of level >= 2 holding a block marked in block_mask [V, n_blocks] is opened, level by level,
    down to LOD1 gists: the marked blocks end up GIST (blocks already RAW or GIST stay; a RAW block beside the
    node's gist is then in place)."""
    lod = lod_map
    for level in range(max_level(lod.size(1), K), 1, -1):
        opened = node_sum(block_mask, K ** (level - 1)) > 0
        lod = torch.where(opened & (lod == level), level - 1, lod).to(lod_map.dtype)
    return lod


def open_partial_nodes(lod_map, nodes, K: int):
    """Maps [V, n_blocks] with each partial node (level, g, j) of `nodes` opened into its j children where it is
    shown (+j-1 entries each): a session's map after the boundary moved and those nodes' gists were replaced."""
    lod = lod_map.clone()
    for level, g, j in nodes:
        start, child = g * K ** (level - 1), K ** (level - 2)
        run = lod[:, start:start + j * child]  # [V, j * child] view
        run.copy_(torch.where(run == level, level - 1, run))
    return lod


def close_partial_nodes(lod_map, nodes, K: int):
    """Maps [V, n_blocks] with each partial node (level, g, j) of `nodes` shown as one entry where all its j children
    are shown as their gists (-(j-1) entries each): what the inference focus from the partial cover shows when it picked
    nothing under the node (the inverse of `open_partial_nodes`)."""
    lod = lod_map.clone()
    for level, g, j in nodes:
        start, child = g * K ** (level - 1), K ** (level - 2)
        run = lod[:, start:start + j * child]  # [V, j * child] view
        run.copy_(torch.where((run == level - 1).all(1, keepdim=True), level, run))
    return lod


def collapse_blocks(lod_map, block_mask, recent_blocks: int):
    """RAW blocks marked in block_mask [V, n_blocks] become GIST (-(K-1) entries each), except the last
    `recent_blocks` blocks, which stay raw (the tail invariant)."""
    n = lod_map.size(1)
    outside_tail = torch.arange(n, device=lod_map.device) < n - recent_blocks  # [n_blocks]
    return torch.where(block_mask & outside_tail & (lod_map == RAW), GIST, lod_map).to(lod_map.dtype)


def collapse_groups(lod_map, group_mask, K: int):
    """Complete groups marked in group_mask [V, G] whose K blocks are all GIST become GROUP (-(K-1) each)."""
    n = lod_map.size(1)
    all_gist = _group_view(lod_map == GIST, K).all(-1)  # [V, ceil(n / K)]; False for the incomplete group
    ok = _blocks_of_groups(group_mask, n, K) & _blocks_of_groups(all_gist, n, K)  # [V, n_blocks]
    return torch.where(ok, GROUP, lod_map).to(lod_map.dtype)


# ---------------------------------------------------------------------------------------------
# constructors

def most_compressed_map(n_blocks: int, cfg: MCConfig, tail_tokens: int = 0, device=None):
    """The most compressed legal map [n_blocks] int8: the last R // K blocks RAW, every older block in the highest
    node of the tree that may show it (complete nodes, and with cfg.partial_gists the partial node of each
    level: then one entry per non-zero base-K digit of the older blocks); if that still exceeds W, the oldest
    entries are UNCOVERED, one entry each, until it fits."""
    K, W = cfg.block_size, cfg.wc_budget
    recent = min(cfg.recent // K, n_blocks)
    older = n_blocks - recent
    raw_entries = recent * K + tail_tokens
    if raw_entries > W:
        raise ValueError(f"the raw tail of {raw_entries} tokens ({recent} recent blocks of --mc_block_size={K} "
                         f"+ {tail_tokens} partial-block tokens) exceeds --mc_wc_budget={W}")
    b = torch.arange(n_blocks, device=device)  # [n_blocks]
    lod = torch.where(b < older, GIST, RAW)
    for level in range(2, max_level(n_blocks, K) + 1):  # shown_end shrinks with the level: the highest wins
        lod = torch.where(b < shown_end(n_blocks, level, cfg), level, lod)
    starts = (lod >= GIST) & (b % torch.pow(K, (lod - 1).clamp(min=0)) == 0)  # [n] entries of the older blocks
    over = int(starts.sum()) + raw_entries - W  # entries to drop; each uncovered entry frees one
    if over > 0:
        lod = torch.where((lod >= GIST) & (starts.cumsum(0) <= over), UNCOVERED, lod)
    return lod.to(torch.int8)


def _pick_random(candidates, n_afford, generator):
    """Mark up to n_afford [V] random candidates [V, N] per row (random priorities, rank < n_afford)."""
    V, N = candidates.shape
    priority = torch.rand(V, N, generator=generator, device=candidates.device)
    priority = torch.where(candidates, priority, 2.0)  # non-candidates sort last
    order = priority.argsort(dim=1)  # [V, N]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(V, N))
    return candidates & (rank < n_afford[:, None])


def _pick_random_within(candidates, cost, budget, generator):
    """Random candidates [V, N] of the given costs [V, N] (a random order, its longest prefix within budget [V])."""
    V, N = candidates.shape
    priority = torch.where(candidates, torch.rand(V, N, generator=generator, device=candidates.device), 2.0)
    order = priority.argsort(dim=1)  # [V, N]
    spent = torch.where(candidates, cost, 0).gather(1, order).cumsum(1)  # [V, N]
    take = candidates.gather(1, order) & (spent <= budget[:, None])
    return torch.zeros_like(candidates).scatter(1, order, take)


def random_maps(V: int, n_blocks: int, cfg: MCConfig, generator=None, tail_tokens: int = 0, device=None):
    """V random legal maps [V, n_blocks] int8 within the budget W, keeping the last R tokens raw.

    Start from the most compressed map; level by level from the top, spend a random fraction (uniform per
    variant and level) of the free budget on opening random nodes into their children (at LOD2 at least
    enough that the LOD1 blocks can absorb the rest), then the rest on expanding random LOD1 blocks
    (including blocks of just-opened nodes). Opening a node of j children costs j-1 entries (K-1 when
    complete), expanding a block K-1. One round per level, each vectorised over V and blocks.
    `generator` must live on `device`.
    """
    K, W = cfg.block_size, cfg.wc_budget
    cost = edit_cost(K)
    lod = most_compressed_map(n_blocks, cfg, tail_tokens, device).expand(V, n_blocks).clone()
    slack = W - entry_counts(lod, K, tail_tokens)  # [V]
    b = torch.arange(n_blocks, device=lod.device)
    for level in range(max_level(n_blocks, K), 1, -1):
        size = K ** (level - 1)
        node = lod == level
        if not bool(node.any()):
            continue
        first = node & (b % size == 0)  # [V, n] one candidate per node, at its first block
        open_cost = node_sum(node, size) // (size // K) - 1  # [V, n] children - 1
        fraction = torch.rand(V, generator=generator, device=lod.device)
        share = (fraction * slack).long()
        if level == 2:  # at least what the LOD1 blocks could not absorb
            share = torch.maximum(share, slack - cost * (lod == GIST).sum(1))
        chosen = _pick_random_within(first, open_cost, share, generator)
        opened = node_sum(chosen, size) > 0
        lod = torch.where(opened & node, level - 1, lod).to(torch.int8)
        slack = slack - torch.where(chosen, open_cost, 0).sum(1)
    chosen = _pick_random(lod == GIST, slack // cost, generator)
    return expand_blocks(lod, chosen)


# ---------------------------------------------------------------------------------------------
# materialisation

@dataclasses.dataclass
class WorkingContext:
    """A batch of V materialised working contexts, right-padded to W entries."""
    embeds: torch.Tensor   # [V, W, D] entry embeddings (dtype/device of the levels); padding = 0
    pos: torch.Tensor      # [V, W] long, global start token of each entry; padding = 0
    span: torch.Tensor     # [V, W] long, tokens covered: 1, K, K**l (a partial node: its children's); padding = 1
    lod: torch.Tensor      # [V, W] long, 0 token, l >= 1 a LOD-l gist; padding = 0
    targets: torch.Tensor  # [V, W] long, next token of LOD0 entries, else -1; padding = -1
    valid: torch.Tensor    # [V, W] bool, real entries (a prefix of each row)
    sample: torch.Tensor   # [V] long, history row each variant reads
    lod_map: torch.Tensor  # [V, n_blocks] int8, the maps this batch was built from
    history_len: int       # T, tokens of history (n_blocks * K + partial block)

    @property
    def n_entries(self):  # [V]
        return self.valid.sum(1)


def take_rows(wc: WorkingContext, rows) -> WorkingContext:
    """The working contexts `rows` (an index or a bool mask over V) of a batch."""
    return dataclasses.replace(wc, **{f.name: getattr(wc, f.name)[rows] for f in dataclasses.fields(wc) if f.name != "history_len"})


def default_samples(V: int, B: int, device=None):
    """Sample of each variant when V = B * n: sequence-major, variants of a sequence adjacent."""
    if V % B:
        raise ValueError(f"{V} variants cannot be spread evenly over {B} sequences; pass `sample` explicitly")
    return torch.arange(V, device=device) // (V // B)


def materialize(lod_map, levels, tokens, cfg: MCConfig, next_token=None, sample=None) -> WorkingContext:
    """Build V working contexts from LOD maps [V, n_blocks] and the tree levels.

    levels: [LOD0 [B, T, D], LOD1 [B, T // K, D], LOD2, ...] as `mc.tree.build_tree` returns them (rows:
    `mc.tree.level_rows`; as many levels as the maps use), where T may include a partial block of t < K
    tokens (always raw). tokens [B, T]: the history ids.
    next_token [B]: the token after the history (target of the last position), else -1.
    sample [V]: history row of each variant (default: `default_samples`).
    Raises ValueError when a map is illegal or exceeds W (one host sync for both checks).
    """
    K, W = cfg.block_size, cfg.wc_budget
    lod0 = levels[0]
    B, T, D = lod0.shape
    device = lod0.device
    lod = lod_map.to(device=device, dtype=torch.int8)  # [V, n]
    V, n = lod.shape
    t = T - n * K
    if not 0 <= t < K or levels[1].shape[:2] != (B, n):
        raise ValueError(f"LOD map of {n} blocks does not match a history of {T} tokens with K={K} "
                         f"(LOD1 level {tuple(levels[1].shape)})")
    if tokens.shape != (B, T):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match the LOD0 level {tuple(lod0.shape)}")
    for level, lvl in enumerate(levels[2:], start=2):
        if lvl.shape[:2] != (B, level_rows(n, level, cfg)):
            raise ValueError(f"LOD{level} level {tuple(lvl.shape)} does not match {n} blocks with K={K} "
                             f"(expected {level_rows(n, level, cfg)} rows)")
    sample = default_samples(V, B, device) if sample is None else sample.to(device).long()

    counts = entry_counts(lod, K, t)  # [V]
    legal = is_legal(lod, K, cfg.recent // K, max_lod=len(levels) - 1, partial=cfg.partial_gists)
    max_count, n_illegal = torch.stack([counts.max(), (~legal).sum()]).tolist() if V else (0, 0)
    if n_illegal:
        v = int((~legal).nonzero()[0])
        raise ValueError(f"LOD map of variant {v} is illegal (nodes must be nodes of the tree, uncovered "
                         f"blocks a prefix, the last {cfg.recent // K} blocks raw, LOD <= {len(levels) - 1}): "
                         f"{lod[v].tolist()}")
    if max_count > W:
        v = int(counts.argmax())
        raise ValueError(f"LOD map of variant {v} needs {max_count} entries > --mc_wc_budget={W}")

    # slot grid, two slots per token position s: 2s a gist whose node starts at s, 2s+1 the raw token s
    s = torch.arange(T, device=device)  # [T]
    starts = torch.cat([gist_starts(lod, K).repeat_interleave(K, dim=1), lod.new_zeros(V, t).long()], dim=1)  # [V, T]
    is_raw = torch.cat([lod.repeat_interleave(K, dim=1) == RAW, lod.new_ones(V, t, dtype=torch.bool)], dim=1)
    slot_lod = torch.stack([starts, torch.zeros_like(starts)], dim=2).view(V, 2 * T)  # [V, 2T]
    valid_slot = torch.stack([(starts > 0) & (s % K == 0), is_raw], dim=2).view(V, 2 * T)
    dest = torch.where(valid_slot, valid_slot.cumsum(1) - 1, W)  # [V, 2T]; column W is a dump
    pos = torch.zeros(V, W + 1, dtype=torch.long, device=device)
    pos = pos.scatter_(1, dest, s.repeat_interleave(2).expand(V, 2 * T))[:, :W]  # [V, W]
    entry_lod = torch.zeros(V, W + 1, dtype=torch.long, device=device).scatter_(1, dest, slot_lod)[:, :W]
    valid = torch.arange(W, device=device) < counts[:, None]  # [V, W], right padding
    pos = torch.where(valid, pos, 0)
    entry_lod = torch.where(valid, entry_lod, RAW)  # [V, W]

    # one gather from [LOD0 rows | LOD1 rows | LOD2 rows | ... | a zero row for padding]
    rows = torch.tensor([lvl.size(1) for lvl in levels], device=device)  # [L+1]
    offset = torch.cumsum(B * rows, 0) - B * rows  # [L+1] first table row of each level
    row = sample[:, None]  # [V, 1]
    src = offset[entry_lod] + row * rows[entry_lod] + pos // torch.pow(K, entry_lod)
    src = torch.where(valid, src, int(B * rows.sum()))
    table = torch.cat([lvl.reshape(-1, D) for lvl in levels] + [lod0.new_zeros(1, D)])  # [B sum(rows) + 1, D]
    embeds = table.index_select(0, src.view(-1)).view(V, W, D)

    # targets from positions: token[p+1] for LOD0 entries, next_token after the last position
    after = torch.full((B, 1), -1, dtype=torch.long, device=device) if next_token is None \
        else next_token.to(device).long().view(B, 1)
    following = torch.cat([tokens.to(device).long(), after], dim=1).view(-1)  # [B * (T+1)]
    targets = following[row * (T + 1) + pos + 1]  # [V, W]
    targets = torch.where(valid & (entry_lod == RAW), targets, -1)
    # spans: K^l tokens, or up to the end of what the level may show (a partial node covers its children only)
    ends = torch.tensor([T] + [shown_end(n, level, cfg) * K for level in range(1, len(levels))], device=device)
    span = torch.minimum(pos + torch.pow(K, entry_lod), ends[entry_lod]) - pos
    span = torch.where(valid & (entry_lod > RAW), span, 1)
    return WorkingContext(embeds, pos, span, entry_lod, targets, valid, sample, lod_map, T)


# ---------------------------------------------------------------------------------------------
# validation (tests and the --mc debug flag)

def entry_token_ids(pos, lod, tokens, valid=None, sample=None):
    """The token of every entry [V, W] (-1 for gists and padding), for a GPT with value embeddings: pos/lod [V, W]
    of entries over histories tokens [B, T] (sample [V]: each row's history, default row 0)."""
    rows = sample[:, None] if sample is not None else 0
    is_token = lod == 0 if valid is None else (lod == 0) & valid
    return torch.where(is_token, tokens[rows, pos.clamp(max=tokens.size(1) - 1)], -1)


class WorkingContextError(ValueError):
    """A materialised working context breaks one of the invariants of docs/architecture.md §4."""


def _check(bad, invariant: str, describe):
    """Raise for the first (variant, entry) where `bad` [V, W] holds, described by describe(v, w)."""
    if bad.any():
        v, w = (int(i) for i in bad.nonzero()[0])
        raise WorkingContextError(f"WC invariant {invariant} violated at variant {v}, entry {w}: {describe(v, w)}")


def validate_wc(wc: WorkingContext, tokens, cfg: MCConfig, next_token=None):
    """Check the five invariants of a materialised batch (plus right padding); raise WorkingContextError.

    1 alignment: an LOD-l entry starts at a multiple of K**l and spans K**l tokens (a partial node, with
      cfg.partial_gists: 2 to K-1 of its children, K**(l-1) tokens each)
    2 coverage: entries tile [start, T) in order, without gaps or overlaps, ending at T; a raw token may also
      lie inside the gist before it (a block shown beside its node's gist)
    3 budget: at most W = cfg.wc_budget entries
    4 tail: every entry touching the last R tokens is LOD0
    5 targets: an LOD0 entry at p has target token[p+1] (next_token, else -1, for p = T-1); gists -1
    """
    K, W, R = cfg.block_size, cfg.wc_budget, cfg.recent
    T = tokens.size(1)
    V, Wc = wc.valid.shape
    pos, span, lod, valid, tgt = wc.pos, wc.span, wc.lod, wc.valid, wc.targets
    if wc.history_len != T:
        raise WorkingContextError(f"WC built over {wc.history_len} tokens, validated against {T}")
    # right padding: real entries form a prefix of each row, padding has target -1
    _check(valid[:, 1:] & ~valid[:, :-1] if Wc > 1 else valid[:, :0], "(right padding)",
           lambda v, w: "a real entry follows padding")
    _check(~valid & (tgt != -1), "(right padding)", lambda v, w: f"padding has target {int(tgt[v, w])}, not -1")
    # 1 alignment
    _check(valid & (lod < 0), "1 (alignment)", lambda v, w: f"unknown LOD {int(lod[v, w])}")
    lod_c = lod.clamp(min=0)
    size, child = torch.pow(K, lod_c), torch.pow(K, (lod_c - 1).clamp(min=0))
    partial = cfg.partial_gists & (lod_c >= 2) & (span % child == 0) & (span >= 2 * child) & (span < size)
    _check(valid & (((span != size) & ~partial) | (pos % size != 0) | (pos < 0)), "1 (alignment)",
           lambda v, w: f"LOD{int(lod[v, w])} entry at position {int(pos[v, w])} spans {int(span[v, w])} tokens; "
                        f"it must start at a multiple of {int(size[v, w])} and span that many"
                        f"{' (or, a partial node, 2 or more of its children)' if cfg.partial_gists else ''}")
    # 2 coverage: each entry starts where the entries before it end, or is a raw token shown beside the gist
    # before it (inside what is covered, after the previous entry's start)
    end = pos + span  # [V, W]
    covered = torch.where(valid, end, 0).cummax(1).values  # [V, W] end of the coverage up to each entry
    both = valid[:, 1:] & valid[:, :-1]
    beside = (lod[:, 1:] == 0) & (end[:, 1:] <= covered[:, :-1]) & (pos[:, 1:] >= pos[:, :-1] + (lod[:, :-1] == 0).long())
    _check(both & (pos[:, 1:] != covered[:, :-1]) & ~beside, "2 (coverage)",
           lambda v, w: f"entry ends at token {int(covered[v, w])} but the next starts at {int(pos[v, w + 1])}")
    last = (valid.sum(1) - 1).clamp(min=0)  # [V]
    last_end = covered.gather(1, last[:, None])[:, 0]
    _check((~valid[:, :1] | (last_end != T)[:, None]) & (T > 0), "2 (coverage)",
           lambda v, w: f"the entries end at token {int(last_end[v])}, not at the history length {T}"
           if valid[v, 0] else "the WC is empty")
    # 3 budget
    if Wc > W:
        raise WorkingContextError(f"WC invariant 3 (budget) violated: {Wc} entries > --mc_wc_budget={W}")
    # 4 tail
    _check(valid & (end > T - R) & (lod != 0), "4 (tail)",
           lambda v, w: f"LOD{int(lod[v, w])} entry at position {int(pos[v, w])} lies in the raw tail "
                        f"(the last {R} of {T} tokens)")
    # 5 targets
    B = tokens.size(0)
    after = torch.full((B, 1), -1, dtype=torch.long, device=tokens.device) if next_token is None \
        else next_token.long().view(B, 1)
    following = torch.cat([tokens.long(), after], dim=1)[wc.sample]  # [V, T+1]
    expected = torch.where(lod == 0, following.gather(1, (pos + 1).clamp(0, T)), -1)
    _check(valid & (tgt != expected), "5 (targets)",
           lambda v, w: f"LOD{int(lod[v, w])} entry at position {int(pos[v, w])} has target {int(tgt[v, w])}, "
                        f"expected {int(expected[v, w])}")


def tail_mask(valid, tail_len):
    """The last tail_len (int or [V]) valid entries of each row of valid [V, W] -> [V, W] bool."""
    from_end = valid.flip(-1).long().cumsum(-1).flip(-1)  # [V, W] valid entries at or after each slot
    tail_len = torch.as_tensor(tail_len, device=valid.device).view(-1, 1)  # [V|1, 1]
    return valid & (from_end <= tail_len)


def truncation_map(n_blocks: int, cfg: MCConfig, device=None):
    """[n_blocks] int8: the last W // K blocks raw, everything before uncovered (the truncation arm)."""
    keep = min(cfg.wc_budget // cfg.block_size, n_blocks)
    b = torch.arange(n_blocks, device=device)
    return torch.where(b >= n_blocks - keep, RAW, UNCOVERED).to(torch.int8)


def none_map(n_blocks: int, cfg: MCConfig, device=None):
    """[n_blocks] int8: only the raw tail (the last R // K blocks); everything older uncovered."""
    b = torch.arange(n_blocks, device=device)
    return torch.where(b >= n_blocks - min(cfg.recent // cfg.block_size, n_blocks), RAW, UNCOVERED).to(torch.int8)
