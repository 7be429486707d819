"""The GPT: a small, fast decoder in the nanochat style.

- depth dial: width = 64 * depth (head dim 64 by default, 128 allowed)
- rotary position embeddings, QK-norm, parameter-free RMSNorm, ReLU^2 MLP
- untied token embedding and LM head, logit softcap, zero-initialised output projections
- SDPA attention with `is_causal=True` on the fast path, and a KV cache for prefill/decode

The hooks MegaContext uses (DESIGN.md section 2) are plain `forward` arguments: `inputs_embeds`
replaces the embedding lookup, `rope=(cos, sin)` gives per-row rotary tables `[B, T, 1, hd/2]`,
targets of -1 are ignored, and `loss_reduction='none'` returns the per-position loss `[B, T]`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 256
    head_dim: int = 64
    n_kv_head: int = 0  # 0 = same as n_head (no grouped-query attention)
    softcap: float = 15.0
    rope_base: float = 10000.0

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @classmethod
    def from_depth(cls, depth: int, **kwargs) -> "GPTConfig":
        """The depth dial: width = 64 * depth."""
        return cls(n_layer=depth, n_embd=64 * depth, **kwargs)

    def validate(self):
        if self.head_dim not in (64, 128):
            raise ValueError(f"head_dim must be 64 or 128, got {self.head_dim}")
        if self.n_embd % self.head_dim:
            raise ValueError(f"model width {self.n_embd} is not a multiple of head_dim {self.head_dim}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.kv_heads}")
        if min(self.n_layer, self.vocab_size, self.sequence_len) < 1:
            raise ValueError("n_layer, vocab_size and sequence_len must be positive")


def norm(x):
    """Parameter-free RMSNorm."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(positions, head_dim: int, base: float = 10000.0):
    """cos/sin tables for (possibly fractional) positions [..., T] -> each [..., T, hd/2] in fp32."""
    inv_freq = rotary_frequencies(head_dim, base, positions.device)
    angles = positions.float().unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def rotary_frequencies(head_dim: int, base: float = 10000.0, device=None):
    """The rotary angular frequencies omega_i, [hd/2]."""
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)


def apply_rotary(x, cos, sin):
    """Rotate pairs (x1_i, x2_i) of the two halves of the head dim. x [B, T, H, hd], cos/sin [B|1, T, 1, hd/2]."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class KVCache:
    """Keys/values of every layer for up to `max_len` positions of `batch_size` rows.

    `pos` is the number of cached positions; a forward with the cache writes its keys/values at
    `[pos, pos+T)` and advances `pos` after the last layer. Setting `pos` back (see `truncate`)
    reuses a prefix of the cache and overwrites the rest.
    """

    def __init__(self, batch_size, max_len, n_layer, n_kv_head, head_dim, device, dtype):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def truncate(self, n: int):
        """Keep the first n cached positions; later writes start at n."""
        if not 0 <= n <= self.pos:
            raise ValueError(f"cannot truncate a cache holding {self.pos} positions to {n}")
        self.pos = n

    def insert(self, layer: int, k, v):
        """Store k/v [B, Hkv, T, hd] at [pos, pos+T) of `layer`; return all cached keys/values so far."""
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.max_len:
            raise ValueError(f"KV cache overflow: {t1} positions > capacity {self.max_len}")
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # QK-norm, then rotary: a rotation keeps the norm, so for tokens the order does not matter, and
        # damped tables (MegaContext gists) then really shrink the high-frequency parts of q/k.
        q, k = apply_rotary(norm(q), cos, sin), apply_rotary(norm(k), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, hd]
        gqa = self.n_kv_head != self.n_head
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            past = kv_cache.pos
            k, v = kv_cache.insert(self.layer_idx, k, v)
            if past == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            elif T == 1:
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            else:  # a chunk after a cached prefix: query i sees keys up to past + i
                key_pos = torch.arange(past + T, device=x.device)
                query_pos = torch.arange(past, past + T, device=x.device)
                mask = key_pos[None, :] <= query_pos[:, None]
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._rope_len = 0
        self._grow_rotary(config.sequence_len * 2)

    def _grow_rotary(self, length: int):
        """(Re)build the default rotary tables [1, length, 1, hd/2] as non-persistent buffers."""
        positions = torch.arange(length, device=self.lm_head.weight.device)
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_base)
        self.register_buffer("cos", cos[None, :, None, :], persistent=False)
        self.register_buffer("sin", sin[None, :, None, :], persistent=False)
        self._rope_len = length

    @torch.no_grad()
    def init_weights(self):
        """Embeddings ~ N(0, 1), input projections ~ U(+-sqrt(3/fan_in)), output projections zero, small head."""
        nn.init.normal_(self.transformer.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = math.sqrt(3.0 / lin.in_features)
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self._grow_rotary(self._rope_len)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wte.weight.numel() if exclude_embedding else n

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per non-embedding weight plus the attention score/value matmuls."""
        c = self.config
        return 6 * self.num_params(exclude_embedding=True) + 12 * c.n_layer * c.n_embd * c.sequence_len

    def default_rope(self, T: int, offset: int = 0):
        """Standard rotary tables for positions [offset, offset+T): each [1, T, 1, hd/2]."""
        if offset + T > self._rope_len:
            self._grow_rotary(max(2 * self._rope_len, offset + T))
        return self.cos[:, offset:offset + T], self.sin[:, offset:offset + T]

    def new_kv_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        dtype = dtype or self.lm_head.weight.dtype
        return KVCache(batch_size, max_len, c.n_layer, c.kv_heads, c.head_dim, self.lm_head.weight.device, dtype)

    def forward(self, idx=None, targets=None, *, inputs_embeds=None, rope=None, kv_cache=None,
                loss_reduction="mean"):
        """Logits [B, T, V] when targets is None, else the loss (scalar, or [B, T] for 'none')."""
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx or inputs_embeds")
        x = self.transformer.wte(idx) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if rope is None:
            cos, sin = self.default_rope(T, kv_cache.pos if kv_cache is not None else 0)
        else:
            cos, sin = rope
            if cos.shape[-3] != T or cos.shape[-1] != self.config.head_dim // 2 or cos.shape[0] not in (1, B):
                raise ValueError(f"rope tables must be [B|1, {T}, 1, {self.config.head_dim // 2}], got {tuple(cos.shape)}")
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        x = norm(x)
        logits = self.lm_head(x).float()
        logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss
