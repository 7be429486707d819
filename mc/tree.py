"""The MegaContext tree: token embeddings (LOD0) and the gists above them (docs/architecture.md §3).

Notation: K = block size, T = history length in tokens, n = T // K complete blocks, D = model width.
Level l holds one node per complete aligned block of K nodes of level l-1; node g of level l covers
tokens [g*K^l, (g+1)*K^l). The tree grows as deep as the history needs (LOD3 and up): there is no
cap on the level.

Partial gists (`cfg.partial_gists`): only blocks older than the raw tail (the first
`older = n - R // K` blocks, the boundary) are ever shown as gists. The level-l node (l >= 2) that
holds the boundary is incomplete there; when at least 2 of its children are complete and older than
the boundary, it gets a partial gist: one GistNet call over those j children with the other K - j
slots masked (GistNet's key-padding mask, so padding never leaks). Its row in the level replaces
the node's own (a complete node holding the boundary overlaps the raw tail and is never shown).
So the history older than the tail is covered by one node per non-zero base-K digit of `older`:
a working context needs O(log_K T) entries beyond the raw tail (docs/architecture.md §4).

Two ways to build it:
- `build_tree(embeds, gistnet, cfg)` for training: the whole batch of histories at once, one
  batched GistNet call per level (plus one for all partial gists), differentiable (the LM loss
  trains GistNet and the embedding).
- `MCTree` for inference: a batch of B streams (B = 1 is the usual case) growing in lockstep by
  `append(ids)`. Each complete gist is computed once, under no_grad, when its block completes;
  partial gists are recomputed (one GistNet call for all levels) when the boundary moves into a new
  child. Storage is preallocated and doubles when full, so appending costs O(1) amortised per
  token. With `cfg.cache_lod0=False` the tree keeps only token ids and re-embeds tokens when they
  are needed (completing a block, `levels()`, `lod0(...)`).

A tree is saved as part of its session (`mc.session.MCSession.save`: token ids and gists).
"""

import torch
import torch.nn as nn

from mc.config import MCConfig


def boundary(n_blocks: int, cfg: MCConfig) -> int:
    """Blocks older than the raw tail (the ones a working context may show as gists)."""
    return n_blocks - min(cfg.recent // cfg.block_size, n_blocks)


def partial_nodes(n_blocks: int, cfg: MCConfig) -> list[tuple[int, int, int]]:
    """(level, node g, complete children j) of every partial node of a history of n_blocks blocks: the
    level-l node holding the boundary, when j >= 2 of its children are complete and older than it."""
    if not cfg.partial_gists:
        return []
    K, older = cfg.block_size, boundary(n_blocks, cfg)
    out, level = [], 2
    while K ** (level - 2) <= older:
        before = older // K ** (level - 2)  # complete level-(l-1) nodes older than the boundary
        if before % K >= 2:
            out.append((level, before // K, before % K))
        level += 1
    return out


def shown_end(n_blocks: int, level: int, cfg: MCConfig) -> int:
    """Blocks [0, end) that nodes of `level` (>= 1) may show: complete nodes older than the boundary, and
    the partial node of that level, if any."""
    K, older = cfg.block_size, boundary(n_blocks, cfg)
    if level == 1:
        return older
    size, child = K ** (level - 1), K ** (level - 2)
    end = older // size * size
    j = older // child - end // child
    return end + j * child if cfg.partial_gists and j >= 2 else end


def level_rows(n_blocks: int, level: int, cfg: MCConfig) -> int:
    """Rows of level `level` (>= 1) of the tree of n_blocks blocks: its complete nodes, or one more for a
    partial node past them."""
    rows = n_blocks // cfg.block_size ** (level - 1)
    for lvl, g, _ in partial_nodes(n_blocks, cfg):
        if lvl == level:
            rows = max(rows, g + 1)
    return rows


def tree_depth(n_blocks: int, cfg: MCConfig) -> int:
    """Highest level of the tree of n_blocks blocks (at least 1: the LOD1 level, possibly empty)."""
    level = 1
    while level_rows(n_blocks, level + 1, cfg):
        level += 1
    return level


def gist_level(prev, gistnet, level: int, K: int):
    """Gists of the complete K-blocks of prev [B, n, D] -> [B, n // K, D] (one GistNet call)."""
    B, n, D = prev.shape
    m = n // K
    if m == 0:
        return prev.new_zeros(B, 0, D)
    blocks = prev[:, :m * K].reshape(B * m, K, D)  # [B*m, K, D]
    return gistnet(blocks, level=level).view(B, m, D)


def partial_gists(levels, nodes, gistnet, K: int):
    """Gists [B, len(nodes), D] of partial nodes (level, g, j) from the complete rows of `levels`
    ([lod0, lod1, ...]): one GistNet call, the K - j missing children masked."""
    B, _, D = levels[0].shape
    children, masks = [], []
    for level, g, j in nodes:
        kids = levels[level - 1][:, g * K:g * K + j]  # [B, j, D]
        children.append(torch.cat([kids, kids.new_zeros(B, K - j, D)], 1))
        masks.append(torch.arange(K, device=kids.device) < j)
    blocks = torch.stack(children, 1).view(B * len(nodes), K, D)  # [B * P, K, D]
    mask = torch.stack(masks).expand(B, -1, -1).reshape(B * len(nodes), K)  # [B * P, K]
    lvl = torch.tensor([level for level, _, _ in nodes], device=blocks.device).repeat(B)  # [B * P]
    return gistnet(blocks, level=lvl, mask=mask).view(B, len(nodes), D)


def with_partials(levels, nodes, gists):
    """`levels` with the row of each partial node (level, g, j) replaced by (or, past the complete nodes,
    extended with) its gist from gists [B, P, D]."""
    out = list(levels)
    for p, (level, g, _) in enumerate(nodes):
        row = gists[:, p:p + 1]  # [B, 1, D]
        if level == len(out):
            out.append(levels[0].new_zeros(row.size(0), 0, row.size(2)))
        lvl = out[level]
        out[level] = torch.cat([lvl[:, :g], row.to(lvl.dtype), lvl[:, g + 1:]], 1)
    return out


def build_tree(embeds, gistnet, cfg: MCConfig):
    """embeds [B, T, D] -> [lod0 [B, T, D], lod1 [B, T//K, D], lod2, ...] as deep as the history needs (row
    counts: `level_rows`), partial gists in place when cfg.partial_gists."""
    K = cfg.block_size
    levels = [embeds, gist_level(embeds, gistnet, 1, K)]
    while levels[-1].size(1) >= K:
        levels.append(gist_level(levels[-1], gistnet, len(levels), K))
    nodes = partial_nodes(embeds.size(1) // K, cfg)
    return with_partials(levels, nodes, partial_gists(levels, nodes, gistnet, K)) if nodes else levels


class MCTree:
    """A growing tree of B lockstep streams.

    ids [B, T] long, LOD0 [B, T, D] (when cfg.cache_lod0), complete gists LOD l [B, T//K^l, D] (one buffer
    per level, added as the history deepens) live in the first rows of preallocated buffers whose
    capacity doubles when full; `partial` holds the partial nodes [(level, g, j)] and their gists [B, P, D].
    `embedding` (the GPT's wte) and `gistnet` are needed to append; a loaded tree can be read without them.
    """

    def __init__(self, cfg: MCConfig, embedding: nn.Embedding | None, gistnet: nn.Module | None,
                 batch_size: int = 1, capacity: int = 1024, *, d_model: int | None = None,
                 device=None, dtype=None):
        if embedding is not None:
            d_model = d_model or embedding.embedding_dim
            device = device or embedding.weight.device
            dtype = dtype or embedding.weight.dtype
        if d_model is None:
            raise ValueError("MCTree needs an embedding module or an explicit d_model")
        self.cfg, self.embedding, self.gistnet = cfg, embedding, gistnet
        self.batch_size, self.d_model = batch_size, d_model
        self.device, self.dtype = torch.device(device or "cpu"), dtype or torch.float32
        self.T = 0  # tokens held (host-side int: no device sync on the decode path)
        K, cap = cfg.block_size, max(capacity, 1)
        self.ids = torch.zeros(batch_size, cap, dtype=torch.long, device=self.device)  # [B, cap]
        self.lod0_cache = self._empty(cap) if cfg.cache_lod0 else None  # [B, cap, D]
        self.gists = [self._empty(max(cap // K, 1))]  # complete nodes of LOD l at [l-1]
        self.partial = ([], self._empty(0))  # ([(level, g, j)], gists [B, P, D])

    def _empty(self, cap: int):
        return torch.zeros(self.batch_size, cap, self.d_model, dtype=self.dtype, device=self.device)

    @staticmethod
    def _grow(buf, needed: int):
        """buf [B, cap, ...] with capacity >= needed along dim 1 (doubling), filled part kept."""
        cap = buf.size(1)
        if needed <= cap:
            return buf
        new = buf.new_zeros(buf.size(0), max(needed, 2 * cap), *buf.shape[2:])
        new[:, :cap] = buf
        return new

    # ---- reading -------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self.T

    def num_nodes(self, level: int) -> int:
        """Complete nodes held at `level` (0 = tokens): T // K^level."""
        return self.T // self.cfg.block_size ** level

    @property
    def token_ids(self):
        """[B, T] view of the history's token ids."""
        return self.ids[:, :self.T]

    def lod0(self, start: int = 0, end: int | None = None):
        """Token embeddings of positions [start, end) -> [B, end-start, D] (cached view or re-embedded)."""
        end = self.T if end is None else end
        if not 0 <= start <= end <= self.T:
            raise ValueError(f"token range [{start}, {end}) is outside the history of {self.T} tokens")
        if self.lod0_cache is not None:
            return self.lod0_cache[:, start:end]
        return self._embed(self.ids[:, start:end])

    def levels(self):
        """[lod0 [B, T, D], lod1 [B, T//K, D], ...] as `build_tree` returns them (LOD0 re-embedded if not cached,
        partial gists in place)."""
        complete = [g[:, :self.num_nodes(l)] for l, g in enumerate(self.gists, start=1) if self.num_nodes(l) or l == 1]
        nodes, gists = self.partial
        return with_partials([self.lod0()] + complete, nodes, gists)

    # ---- growing -------------------------------------------------------------------------------

    @torch.no_grad()
    def _embed(self, ids):
        if self.embedding is None:
            raise ValueError("this tree holds no LOD0 cache and has no embedding module to re-embed tokens; "
                             "pass embedding= (the GPT's transformer.wte)")
        return self.embedding(ids).to(self.dtype)

    @torch.no_grad()
    def append(self, ids):
        """Append tokens ids [B, n] (or [n] when B = 1); gists of newly completed blocks are computed once."""
        if self.gistnet is None:
            raise ValueError("this tree has no GistNet to compute gists; pass gistnet= when building or loading it")
        ids = torch.as_tensor(ids, device=self.device).long()
        if ids.dim() == 1 and self.batch_size == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.size(0) != self.batch_size:
            raise ValueError(f"append expects token ids [{self.batch_size}, n], got {tuple(ids.shape)}")
        n, K = ids.size(1), self.cfg.block_size
        if n == 0:
            return
        t0, t1 = self.T, self.T + n
        self.ids = self._grow(self.ids, t1)
        self.ids[:, t0:t1] = ids
        if self.lod0_cache is not None:
            self.lod0_cache = self._grow(self.lod0_cache, t1)
            self.lod0_cache[:, t0:t1] = self._embed(ids)
        self.T = t1
        level = 1
        while True:  # one iteration per level that gains a node: O(log_K T) at most
            old, new = t0 // K ** level, t1 // K ** level  # nodes of this level before / after
            if new == old:
                break  # no block completed here, so none above either
            if level > len(self.gists):
                self.gists.append(self._empty(new))
            if level == 1:
                children = self.lod0(old * K, new * K)  # [B, (new-old)*K, D]
            else:
                children = self.gists[level - 2][:, old * K:new * K]
            g = gist_level(children, self.gistnet, level, K)  # [B, new-old, D]
            self.gists[level - 1] = self._grow(self.gists[level - 1], new)
            self.gists[level - 1][:, old:new] = g.to(self.dtype)
            level += 1
        if t0 // K != t1 // K:
            self._update_partials()

    def _update_partials(self):
        """Recompute the partial gists whose node or children changed (one GistNet call)."""
        nodes = partial_nodes(self.T // self.cfg.block_size, self.cfg)
        old_nodes, old_gists = self.partial
        if nodes == old_nodes:
            return
        kept = {node: old_gists[:, p] for p, node in enumerate(old_nodes)}
        todo = [node for node in nodes if node not in kept]
        if todo:
            complete = [self.lod0(0, 0)] + [g[:, :self.num_nodes(l)] for l, g in enumerate(self.gists, 1)]
            fresh = partial_gists(complete, todo, self.gistnet, self.cfg.block_size).to(self.dtype)
            kept.update({node: fresh[:, p] for p, node in enumerate(todo)})
        self.partial = (nodes, torch.stack([kept[node] for node in nodes], 1) if nodes else self._empty(0))
