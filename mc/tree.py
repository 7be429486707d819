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
  (completing a block, `levels()`, `block(1, i)`, `lod0(...)`).

`MCTree.save` / `MCTree.load` keep a session across restarts: one torch file with the filled parts
of the tensors, the MCConfig and a format version, written atomically and read with
`weights_only=True`. Corrupt, truncated, foreign or inconsistent files raise ValueError naming
the file.
"""

import os
import tempfile
from dataclasses import asdict, fields

import torch
import torch.nn as nn

from mc.config import MCConfig
from nanochat.checkpoint import load_error_reason

FORMAT = "megacontext-tree"
FORMAT_VERSION = 1


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


def read_state_file(path: str, what: str):
    """The object torch saved at `path` (weights only), or a clear error for a missing, corrupt or truncated
    MegaContext `what` file (tree, session)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"MegaContext {what} file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any parse failure of foreign bytes (pickle raises a zoo of types)
        raise ValueError(f"{path} is not a readable MegaContext {what}: corrupt or truncated "
                         f"({load_error_reason(e)})") from None


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

    def block(self, level: int, i: int):
        """The K children of node i of `level` (whose gist that node is) -> [B, K, D].

        block(1, i) = embeddings of tokens [i*K, (i+1)*K); block(2, i) = LOD1 gists [i*K, (i+1)*K).
        """
        K = self.cfg.block_size
        if not 1 <= level <= self.cfg.max_lod:
            raise ValueError(f"level must be in [1, {self.cfg.max_lod}], got {level}")
        if not 0 <= i < self.num_nodes(level):
            raise ValueError(f"node {i} of level {level} does not exist ({self.num_nodes(level)} complete)")
        if level == 1:
            return self.lod0(i * K, (i + 1) * K)
        return self.gists[level - 2][:, i * K:(i + 1) * K]

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

    # ---- persistence ---------------------------------------------------------------------------

    def save(self, path):
        """Write the filled tensors + config + format version to `path` atomically (temp file, then os.replace)."""
        path = os.fspath(path)
        state = {
            "format": FORMAT, "version": FORMAT_VERSION, "config": asdict(self.cfg),
            "num_tokens": self.T, "d_model": self.d_model,
            "ids": self.token_ids.cpu(),
            "lod0": None if self.lod0_cache is None else self.lod0_cache[:, :self.T].cpu(),
            "gists": [g[:, :self.num_nodes(l)].cpu() for l, g in enumerate(self.gists, start=1)],
        }
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                                   dir=os.path.dirname(os.path.abspath(path)))
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path, embedding: nn.Embedding | None = None, gistnet: nn.Module | None = None, device=None):
        """Read a tree saved by `save`; tensors go to the embedding's device (or `device`, default CPU)."""
        path = os.fspath(path)
        state = read_state_file(path, "tree")
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{path} is not a MegaContext tree file (no '{FORMAT}' format marker)")
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} is a MegaContext tree of format version {state.get('version')}; "
                             f"this code reads version {FORMAT_VERSION}")
        try:
            known = {f.name for f in fields(MCConfig)}
            cfg = MCConfig(**{k: v for k, v in state["config"].items() if k in known})
            T, D, ids, lod0, gists = (state[k] for k in ("num_tokens", "d_model", "ids", "lod0", "gists"))
            B, K = ids.size(0), cfg.block_size
            shapes_ok = (ids.shape == (B, T) and len(gists) == cfg.max_lod
                         and all(g.shape == (B, T // K ** l, D) for l, g in enumerate(gists, start=1))
                         and (lod0 is None if not cfg.cache_lod0 else lod0.shape == (B, T, D)))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is an incomplete MegaContext tree file ({type(e).__name__}: {e})") from None
        if not shapes_ok:
            raise ValueError(f"{path} holds inconsistent MegaContext tree tensors (T={T}, K={K}, D={D})")
        if embedding is not None and embedding.embedding_dim != D:
            raise ValueError(f"{path} holds a tree of width {D} but the embedding has width {embedding.embedding_dim}")
        dtype = gists[0].dtype
        tree = cls(cfg, embedding, gistnet, batch_size=B, capacity=max(T, 1), d_model=D,
                   device=device or (embedding.weight.device if embedding is not None else "cpu"), dtype=dtype)
        tree.T = T
        tree.ids[:, :T] = ids.to(tree.device)
        if lod0 is not None:
            tree.lod0_cache[:, :T] = lod0.to(tree.device, dtype)
        for l, g in enumerate(gists, start=1):
            tree.gists[l - 1][:, :g.size(1)] = g.to(tree.device, dtype)
        return tree
