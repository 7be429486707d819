"""The MegaContext tree: token embeddings (LOD0) and the gists above them (docs/architecture.md §3).

Notation: K = block size, T = history length in tokens, D = model width. Level l holds one node
per complete aligned block of K nodes of level l-1; node n of level l covers tokens
[n*K^l, (n+1)*K^l). Only complete blocks have gists.

Two ways to build it:
- `build_tree(embeds, gistnet, cfg)` for training: the whole batch of histories at once, one
  batched GistNet call per level, differentiable (the LM loss trains GistNet and the embedding).
- `MCTree` for inference: a batch of B streams (B = 1 is the usual case) growing in lockstep by
  `append(ids)`. Each gist is computed once, under no_grad, when its block completes; storage is
  preallocated and doubles when full, so appending costs O(1) amortised per token. With
  `cfg.cache_lod0=False` the tree keeps only token ids and re-embeds tokens when they are needed
  (completing a block, `levels()`, `lod0(...)`).

A tree is saved as part of its session (`mc.session.MCSession.save`: token ids and gists).
"""

import torch
import torch.nn as nn

from mc.config import MCConfig

def gist_level(prev, gistnet, level: int, K: int):
    """Gists of the complete K-blocks of prev [B, n, D] -> [B, n // K, D] (one GistNet call)."""
    B, n, D = prev.shape
    m = n // K
    if m == 0:
        return prev.new_zeros(B, 0, D)
    blocks = prev[:, :m * K].reshape(B * m, K, D)  # [B*m, K, D]
    return gistnet(blocks, level=level).view(B, m, D)


def build_tree(embeds, gistnet, cfg: MCConfig):
    """embeds [B, T, D] -> [lod0 [B, T, D], lod1 [B, T//K, D], lod2 [B, T//K^2, D]] up to cfg.max_lod."""
    levels = [embeds]
    for level in range(1, cfg.max_lod + 1):
        levels.append(gist_level(levels[-1], gistnet, level, cfg.block_size))
    return levels


class MCTree:
    """A growing tree of B lockstep streams.

    ids [B, T] long, LOD0 [B, T, D] (when cfg.cache_lod0), LOD1 [B, T//K, D], LOD2 [B, T//K^2, D]
    live in the first rows of preallocated buffers whose capacity doubles when full.
    `embedding` (the GPT's wte) and `gistnet` are needed to append; a loaded tree can be read
    without them.
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
        self.gists = [self._empty(max(cap // K ** l, 1)) for l in range(1, cfg.max_lod + 1)]  # LOD l at [l-1]

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
        """Nodes held at `level` (0 = tokens): T // K^level."""
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
        """[lod0 [B, T, D], lod1 [B, T//K, D], ...]: views of the filled parts (LOD0 re-embedded if not cached)."""
        return [self.lod0()] + [g[:, :self.num_nodes(l)] for l, g in enumerate(self.gists, start=1)]

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
        for level in range(1, self.cfg.max_lod + 1):  # at most max_lod (= 2) iterations
            old, new = t0 // K ** level, t1 // K ** level  # nodes of this level before / after
            if new == old:
                break  # no block completed here, so none above either
            if level == 1:
                children = self.lod0(old * K, new * K)  # [B, (new-old)*K, D]
            else:
                children = self.gists[level - 2][:, old * K:new * K]
            g = gist_level(children, self.gistnet, level, K)  # [B, new-old, D]
            self.gists[level - 1] = self._grow(self.gists[level - 1], new)
            self.gists[level - 1][:, old:new] = g.to(self.dtype)
