"""GistNet: one block of K entries -> one gist in the base model's input-embedding space.

A gist stands in for a whole aligned block of history inside a working context (docs/architecture.md §3):
LOD1 gists summarise K token embeddings, LOD l gists summarise K LOD l-1 gists, and one net serves
every level through a learned level embedding (`max_lod` rows; deeper levels, which long sessions
grow, share the last one). A partial gist (mc.tree: an incomplete node's complete children) is the
same call with the missing slots masked.

    blocks [N, K, D] --norm--> + slot embedding + level embedding            (inputs x [N, K, D])
      --body-->      gist_layers bidirectional pre-norm blocks (transformer)  or nothing (mean)
      --pooling-->   mean: masked mean of the outputs
                     query: a learned query attends over the outputs
                     cls: a learned CLS slot is prepended before the body; its output is the pool
      --head-->      linear, or mlp (Linear-ReLU^2-Linear), on norm(pooled)
    gist [N, D] = masked_mean(blocks) + head(...)

The head's last layer (and every residual output projection) starts at zero, so an untrained
gist equals the mean of its block's entries: a sensible stand-in from step 0 that training
then refines through the LM loss.

With `bag_loss_weight` > 0 GistNet also has a bag head, Linear(D -> vocab) on norm(gist), trained
(`bag_loss`) to predict every token a gist covers. The LM loss alone lets a gist forget the rare
tokens of a block the GPT never copies from through it (e.g. a needle's key); LensNet has to
match exactly those against the question to find the block.

Choices recorded here:
- `gist_type="mean"` is the cheap baseline: no body and `gist_pooling` is ignored (the pool is
  the masked mean of the normed inputs, level embedding included); the head is still there.
- A key-padding mask `[N, K]` (True = real) removes padded slots from attention and pooling;
  padded values are zeroed first, so even NaNs there cannot leak. A block with no real slot at
  all gets a zero gist.
- Lookup tables are `nn.Embedding`s and learned vectors are 1-D, so `nanochat.optim` gives them
  AdamW and gives Muon only the true matrices.
- dtype: the caller casts the module (`aux_dtype`); `forward` casts inputs to the module's dtype
  and returns the input's dtype.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mc.config import MCConfig
from mc.tree import partial_nodes
from nanochat.gpt import norm


def num_heads(width: int) -> int:
    """Attention heads of a width: heads of 64 when it divides, else one head."""
    return width // 64 if width % 64 == 0 else 1


def masked_mean(x, mask):
    """Mean of x [N, L, C] over L where mask [N, L] (None = all real) -> [N, C]; 0 for empty rows."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.unsqueeze(-1).to(x.dtype)  # [N, L, 1]
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def init_linear(lin: nn.Linear, zero: bool = False):
    """Input projections ~ U(+-sqrt(3/fan_in)) as in the GPT; output projections zero."""
    if zero:
        nn.init.zeros_(lin.weight)
    else:
        bound = math.sqrt(3.0 / lin.in_features)
        nn.init.uniform_(lin.weight, -bound, bound)
    if lin.bias is not None:
        nn.init.zeros_(lin.bias)


class ReluSquared(nn.Module):
    def forward(self, x):
        return F.relu(x).square()


class EncoderBlock(nn.Module):
    """Bidirectional pre-norm transformer block with QK-norm and a ReLU^2 MLP (no causal mask)."""

    def __init__(self, width: int, mlp_ratio: int = 4):
        super().__init__()
        self.n_head = num_heads(width)
        self.c_q = nn.Linear(width, width, bias=False)
        self.c_k = nn.Linear(width, width, bias=False)
        self.c_v = nn.Linear(width, width, bias=False)
        self.c_proj = nn.Linear(width, width, bias=False)
        self.c_fc = nn.Linear(width, mlp_ratio * width, bias=False)
        self.mlp_proj = nn.Linear(mlp_ratio * width, width, bias=False)

    def init_weights(self):
        for lin in (self.c_q, self.c_k, self.c_v, self.c_fc):
            init_linear(lin)
        init_linear(self.c_proj, zero=True)
        init_linear(self.mlp_proj, zero=True)

    def forward(self, x, attn_mask=None):
        """x [N, L, C], attn_mask [N, 1, 1, L] bool (True = may attend) or None -> [N, L, C]."""
        N, L, C = x.shape
        h = norm(x)
        q, k, v = (lin(h).view(N, L, self.n_head, C // self.n_head).transpose(1, 2)
                   for lin in (self.c_q, self.c_k, self.c_v))  # each [N, H, L, hd]
        q, k = norm(q), norm(k)  # QK-norm
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [N, H, L, hd]
        x = x + self.c_proj(y.transpose(1, 2).reshape(N, L, C))
        return x + self.mlp_proj(F.relu(self.c_fc(norm(x))).square())


class GistNet(nn.Module):
    def __init__(self, cfg: MCConfig, d_model: int, vocab_size: int = 0):
        super().__init__()
        if cfg.bag_loss_weight > 0 and vocab_size < 1:
            raise ValueError("GistNet with --mc_bag_loss_weight > 0 needs the vocab size for its bag head")
        self.cfg, self.d_model = cfg, d_model
        D, K = d_model, cfg.block_size
        self.is_transformer = cfg.gist_type == "transformer"
        self.pooling = cfg.gist_pooling if self.is_transformer else "mean"
        self.level_emb = nn.Embedding(cfg.max_lod, D)  # row l-1 = level l
        if self.is_transformer:
            self.slot_emb = nn.Embedding(K, D)  # learned position of each slot in the block
            self.blocks = nn.ModuleList([EncoderBlock(D, cfg.gist_mlp_ratio) for _ in range(cfg.gist_layers)])
        if self.pooling == "cls":
            self.cls = nn.Parameter(torch.empty(D))
        elif self.pooling == "query":
            self.n_head = num_heads(D)
            self.query = nn.Parameter(torch.empty(D))  # [H * hd], one learned query per head
            self.pool_k = nn.Linear(D, D, bias=False)
            self.pool_v = nn.Linear(D, D, bias=False)
        if cfg.gist_head == "mlp":
            self.head = nn.Sequential(nn.Linear(D, 4 * D, bias=False), ReluSquared(), nn.Linear(4 * D, D, bias=False))
        else:
            self.head = nn.Sequential(nn.Linear(D, D, bias=False))
        self.bag_head = nn.Linear(D, vocab_size, bias=False) if cfg.bag_loss_weight > 0 else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Small random tables and queries, GPT-style projections, zero outputs (gist = block mean)."""
        nn.init.normal_(self.level_emb.weight, std=0.1)
        if self.is_transformer:
            nn.init.normal_(self.slot_emb.weight, std=0.1)
            for block in self.blocks:
                block.init_weights()
        if self.pooling == "cls":
            nn.init.normal_(self.cls, std=1.0)
        elif self.pooling == "query":
            nn.init.normal_(self.query, std=1.0)
            init_linear(self.pool_k)
            init_linear(self.pool_v)
        *inner, last = [m for m in self.head if isinstance(m, nn.Linear)]
        for lin in inner:
            init_linear(lin)
        init_linear(last, zero=True)
        if self.bag_head is not None:
            init_linear(self.bag_head)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def summary(self) -> str:
        c = self.cfg
        body = f"transformer x{c.gist_layers}, {self.pooling} pooling" if self.is_transformer else "mean"
        return f"GistNet({body}, {c.gist_head} head, D={self.d_model}, K={c.block_size}): {self.num_params():,} params"

    def forward(self, blocks, level=1, mask=None):
        """blocks [N, L<=K, D], level int or [N] long (>= 1; levels above max_lod use its embedding), mask [N, L]
        bool (True = real) -> gists [N, D].

        The gist is in the dtype of `blocks`; padded slots (mask False) do not affect it.
        """
        out_dtype = blocks.dtype
        dtype = self.level_emb.weight.dtype
        N, L, _ = blocks.shape  # [N, L, D]
        x = blocks.to(dtype)  # [N, L, D]
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=dtype, device=x.device))
        base = masked_mean(x, mask)  # [N, D] the residual: an untrained gist is the block mean
        has_real = None if mask is None else mask.any(-1, keepdim=True)  # [N, 1]
        level = torch.as_tensor(level, device=x.device).long().clamp(max=self.cfg.max_lod).expand(N) - 1  # [N] table rows
        lvl = self.level_emb(level).unsqueeze(1)  # [N, 1, D]
        x = norm(x) + lvl
        if not self.is_transformer:
            pooled = masked_mean(x, mask)  # [N, D]
        else:
            x = x + self.slot_emb.weight[:L]
            if self.pooling == "cls":
                x = torch.cat([(self.cls + lvl), x], dim=1)  # [N, 1+L, D]
                if mask is not None:
                    mask = F.pad(mask, (1, 0), value=True)  # the CLS slot is always real
            # [N, 1, 1, L'] key-padding mask; a row with no real key attends everywhere (no NaN)
            attn_mask = None if mask is None else (mask | ~mask.any(-1, keepdim=True))[:, None, None, :]
            for block in self.blocks:
                x = block(x, attn_mask)
            if self.pooling == "cls":
                pooled = x[:, 0]
            elif self.pooling == "mean":
                pooled = masked_mean(x, mask)
            else:
                pooled = self.attend_pool(x, attn_mask)
        gist = base + self.head(norm(pooled))
        if has_real is not None:
            gist = gist * has_real.to(gist.dtype)  # an empty block has a zero gist
        return gist.to(out_dtype)

    def bag_loss(self, levels, ids):
        """Mean NLL of every token under its covering gists' bag head: levels = [lod0, lod1 [B, T//K, D], ...] (from
        mc.tree.build_tree), ids [B, T] the tokens. Each level's complete gists predict the K^level tokens they
        cover (partial gists are left out)."""
        B, T = ids.shape
        partial = {(level, g) for level, g, _ in partial_nodes(T // self.cfg.block_size, self.cfg)}
        losses = []
        for level, gists in enumerate(levels[1:], start=1):
            span = self.cfg.block_size ** level
            n = min([T // span] + [g for lvl, g in partial if lvl == level])
            if n == 0:
                continue
            logp = F.log_softmax(self.bag_head(norm(gists[:, :n].to(self.bag_head.weight.dtype))).float(), dim=-1)  # [B, n, V]
            covered = ids[:, :n * span].reshape(B, n, span)  # [B, n, span]
            losses.append(-logp.gather(-1, covered).mean())
        return torch.stack(losses).mean()

    def attend_pool(self, x, attn_mask):
        """A learned query per head attends over x [N, L, D] (attn_mask [N, 1, 1, L] or None) -> [N, D].

        Attention over values pool_v(h) with weights a, computed as pool_v applied to the a-weighted sum of h:
        the same function, with the value projection run once per gist instead of once per token."""
        N, L, D = x.shape
        H, hd = self.n_head, D // self.n_head
        h = norm(x)
        k = norm(self.pool_k(h).view(N, L, H, hd))  # [N, L, H, hd]
        q = norm(self.query.view(H, hd))  # [H, hd]
        scores = torch.einsum("nlhe,he->nhl", k, q) * hd ** -0.5  # [N, H, L]
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask[:, 0], float("-inf"))
        mixed = torch.softmax(scores, dim=-1) @ h  # [N, H, D] each head's weighted sum of the tokens
        return torch.einsum("nhd,hed->nhe", mixed, self.pool_v.weight.view(H, hd, D)).reshape(N, D)
