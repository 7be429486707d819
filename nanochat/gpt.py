"""The GPT: a small, fast decoder in the nanochat style.

- depth dial: width = 64 * depth (head dim 64 by default, 128 allowed)
- rotary position embeddings, QK-norm, parameter-free RMSNorm, ReLU^2 MLP
- untied token embedding and LM head, logit softcap, zero-initialised output projections
- SDPA attention with `is_causal=True` on the fast path, and a KV cache for prefill/decode

Previous-token mixing (`GPTConfig.smear`) gives every position a cheap view of the ones before it,
which is what a copy (induction) circuit needs: "find where my predecessor occurred before, copy what
followed it". Without it a small model has to build a previous-token head first, and at CPU scale it
never does. Two kinds, both on by default ("both"):
- smeared keys: in every layer each key is mixed with the previous position's key,
  k_t <- (1 - a) k_t + a k_{t-1}, one learned a = sigmoid(logit) per KV head (logit 0 at init);
- embedding smear (nanochat's "smear", widened to `smear_taps` previous tokens): each normed input
  embedding gets gated shares of the previous ones, x_t <- x_t + sum_j s_j sigmoid(g_j . x_t[:24]) x_{t-j},
  s_j = 0 at init. It lets queries and keys carry a few tokens of context, so a multi-token key
  ("the silver falcon is" -> " 48", "21", "3") can be matched among decoys that share its last tokens.
Measured on the 2-core CPU (d4 / width 256, T=256, 16 rows a step, bf16; 120 steps of copy rows, then
copy + needle + recall rows of nanochat/longrange.py with corpus filler and 0-15 decoys, loss on the
answers; exact match of the whole value, 64 needles; see the closing note of issue 10):

    mode              needle@128  needle@256  recall   (step 200)  |  needle@128  @256  recall  (step 400)
    none (issue 10)   0.000 after 500 steps through base_train; 0.000 / 0.156 at step 400 (answers only)
    keys              0.156       0.047       0.062                |  (stopped)
    embed, taps 3     0.000       0.000       0.000                |  0.000 at step 300
    both, taps 1      0.609       0.375       0.305                |  0.641  0.531  0.359
    both, taps 3      0.812       0.656       0.492                |  0.891  0.875  0.742
    both, taps 5      0.875       0.859       0.734                |  0.969  1.000  0.891 (step 350)

Smeared keys make the copy circuit form at all (on a toy key -> value task, d2, vocab 512: recall 0.99
at step 200 with them, 0.01 without); the embedding smear then makes it exact on multi-token BPE
values with decoys; 5 taps beat 3 and 1. Language modelling gains too: the CPU preset of run10.sh (books,
d4, T=512, 170 steps) ends at val bpb 1.9004 with "both" vs 1.9164 with "none", in the same wall time
(258 s vs 261 s): a few vector ops per layer, 1-D parameters only.
The predecessor of a position is the previous entry of the sequence, whatever it is (a token, or a
MegaContext gist); the first entry has none (zeros). Every path is exact: training forward, KV-cache
prefill and decode, and a cache truncated to any prefix, because the cache keeps what the next
position mixes in (`KVCache`).

Options from nanochat's current GPT (`GPTConfig` fields, base_train flags), each exact in every path
because it acts per position (or, for windows, through the same key positions the cache holds):
- `layer_scalars`: before block i the residual becomes resid_scale[i] x + x0_share[i] x0 (x0: the normed,
  smeared input embedding; scales start at 1 and 0, so the model starts as without them);
- `backout`: the head reads x - share x_mid, x_mid the input of the middle block (share starts at 0);
- `value_embeds`: alternate layers, the last included, add gate * table[token] to their attention values
  (ResFormer-style; tables start at zero). They need the token of every entry: `forward(inputs_embeds=...,
  token_ids=...)`, where -1 marks an entry that is no token (a MegaContext gist gets no value embedding);
- `window_pattern`: per layer, tiled, L sees every earlier position and S the last sequence_len/2 (the
  last layer always L); a window counts entries of the sequence, which in a working context are entries;
- `vocab_multiple` = 64: embedding and head rows padded for aligned matmuls; logits are cropped to the
  vocabulary, so padding rows are never predicted (checkpoints from before it load unpadded).
Measured on the CPU preset of run10.sh (books, d4/w256, T=512, 170 steps of 8,192 tokens, bf16, same seed),
final val bpb: default 1.9004; layer_scalars 1.9052; backout 1.9009; value_embeds 1.8826; window_pattern SSSL
1.8955; the runs that had the machine to themselves took 274-278 s each (no option costs measurable time).
Value embeddings help most (-0.018 bpb; 2.1M more parameters, all lookups) and are on by default: in the 200-step
retrieval probe (d4, T=256) they raised needle exact match at 128/256 tokens from 0.09/0.09 to 0.22/0.41, and
`run10.sh --mc` on a fresh clone with them (43 min) took the plain twin's full-attention needle at 1,024 tokens
from 0.93 to 0.97 and the MC model's own full attention at 8W from 0.19 to 0.58, the mc arm unchanged (0.77 at 8W).
The others stay off (no gain at this scale; windows lose retrieval: 0.00 in the probe).

The hooks MegaContext uses (docs/architecture.md §2) are plain `forward` arguments: `inputs_embeds`
replaces the embedding lookup, `rope=(cos, sin)` gives per-row rotary tables `[B, T, 1, hd/2]`,
targets of -1 are ignored, and `loss_reduction='none'` returns the per-position loss `[B, T]`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


SMEAR_MODES = ("none", "keys", "embed", "both")
SMEAR_GATE_CHANNELS = 24  # embedding channels the embedding-smear gate reads


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
    smear: str = "both"  # previous-token mixing: "keys" (smeared keys), "embed" (embedding smear), both or none
    smear_taps: int = 5  # previous entries the embedding smear mixes in
    layer_scalars: bool = False  # per layer: a learned scale of the residual stream and share of the input embedding
    backout: bool = False  # the head reads the residual minus a learned share of the one after the middle layer
    vocab_multiple: int = 64  # embedding and head rows padded to a multiple of this (logits are cropped)
    window_pattern: str = "L"  # per layer, tiled: L attends to every earlier position, S to the last sequence_len/2
    value_embeds: bool = True  # alternate layers (the last included) add a per-token embedding to their values

    @property
    def smear_keys(self) -> bool:
        return self.smear in ("keys", "both")

    @property
    def smear_embed(self) -> bool:
        return self.smear in ("embed", "both")

    @property
    def windows(self) -> list:
        """Per layer, how many positions a query sees (itself included), None for all; the last layer sees all."""
        pattern = [None if c == "L" else self.sequence_len // 2 for c in self.window_pattern]
        return [pattern[i % len(pattern)] for i in range(self.n_layer - 1)] + [None]

    def has_value_embeds(self, layer: int) -> bool:
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

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
        if self.smear_taps < 1:
            raise ValueError(f"smear_taps must be >= 1, got {self.smear_taps}")
        if not self.window_pattern or set(self.window_pattern) - set("SL"):
            raise ValueError(f"window_pattern must be letters S (short) and L (long), got {self.window_pattern!r}")
        if self.smear not in SMEAR_MODES:
            raise ValueError(f"smear must be one of {SMEAR_MODES}, got {self.smear!r}")
        if min(self.n_layer, self.vocab_size, self.sequence_len, self.vocab_multiple) < 1:
            raise ValueError("n_layer, vocab_size, sequence_len and vocab_multiple must be positive")


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


def previous_entries(x, before, back: int = 1):
    """x [B, T, ...] -> each position's entry `back` steps earlier, [B, T, ...]. before [B, P >= back, ...] holds
    the entries just before x (from a KV cache; zeros where the sequence has none)."""
    return torch.cat([before[:, before.size(1) - back:].to(x.dtype), x], dim=1)[:, :x.size(1)]


class KVCache:
    """Keys/values of every layer for up to `max_len` positions of `batch_size` rows.

    `pos` is the number of cached positions; a forward with the cache writes its keys/values at
    `[pos, pos+T)` and advances `pos` after the last layer. Setting `pos` back (see `truncate`)
    reuses a prefix of the cache and overwrites the rest.
    With previous-token mixing the cache also keeps, per position, what the next position mixes in:
    the unmixed keys of every layer (`raw_k`, smeared keys) and the normed input embedding
    (`embeds`, embedding smear), so a forward that starts at any cached prefix is exact.
    """

    def __init__(self, batch_size, max_len, n_layer, n_kv_head, head_dim, device, dtype,
                 raw_keys: bool = False, embed_dim: int = 0):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.raw_k = torch.zeros(n_layer, batch_size, max_len, n_kv_head, head_dim, device=device, dtype=dtype) \
            if raw_keys else None  # [L, B, max_len, Hkv, hd]
        self.embeds = torch.zeros(batch_size, max_len, embed_dim, device=device, dtype=dtype) \
            if embed_dim else None  # [B, max_len, D]
        self.max_len = max_len
        self.pos = 0

    def truncate(self, n: int):
        """Keep the first n cached positions; later writes start at n."""
        if not 0 <= n <= self.pos:
            raise ValueError(f"cannot truncate a cache holding {self.pos} positions to {n}")
        self.pos = n

    def _span(self, T: int):
        t0, t1 = self.pos, self.pos + T
        if t1 > self.max_len:
            raise ValueError(f"KV cache overflow: {t1} positions > capacity {self.max_len}")
        return t0, t1

    def insert(self, layer: int, k, v):
        """Store k/v [B, Hkv, T, hd] at [pos, pos+T) of `layer`; return all cached keys/values so far."""
        t0, t1 = self._span(k.size(2))
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]

    def _swap(self, buf, x, n: int):
        """Store x [B, T, ...] at [pos, pos+T) of buf [B, max_len, ...]; return the n entries before pos [B, n, ...]
        (zeros before position 0)."""
        t0, t1 = self._span(x.size(1))
        before = torch.cat([buf.new_zeros(buf.size(0), max(0, n - t0), *buf.shape[2:]), buf[:, max(0, t0 - n):t0]], 1)
        buf[:, t0:t1] = x
        return before

    def swap_raw_keys(self, layer: int, k):
        """Store the unmixed keys k [B, T, Hkv, hd] of `layer`; return the one before them [B, 1, Hkv, hd]."""
        return self._swap(self.raw_k[layer], k, 1)

    def swap_embeds(self, x, n: int):
        """Store the normed input embeddings x [B, T, D]; return the n before them [B, n, D]."""
        return self._swap(self.embeds, x, n)

    def copy_prefix_from(self, other: "KVCache"):
        """Take the cached positions of `other` (batch 1, or this batch size) into every row of this cache."""
        n = other.pos
        for mine, theirs in ((self.k, other.k), (self.v, other.v)):
            mine[:, :, :, :n] = theirs[:, :, :, :n]
        if self.raw_k is not None:
            self.raw_k[:, :, :n] = other.raw_k[:, :, :n]
        if self.embeds is not None:
            self.embeds[:, :n] = other.embeds[:, :n]
        self.pos = n


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # smeared keys: per KV head, the logit of the share of the previous position's key in each key
        self.key_smear = nn.Parameter(torch.zeros(self.n_kv_head)) if config.smear_keys else None
        self.window = config.windows[layer_idx]
        # value embeddings: v += 2 sigmoid(gate . x[:C]) * table[token], per KV head; the table starts at zero
        self.value_gate = nn.Linear(SMEAR_GATE_CHANNELS, self.n_kv_head, bias=False) \
            if config.has_value_embeds(layer_idx) else None

    def forward(self, x, cos, sin, kv_cache=None, value_embed=None, queries: int = 0):
        """queries > 0: the output of the last that many positions only (keys and values still come from all)."""
        B, T, _ = x.shape
        Tq = queries or T
        q = self.c_q(x[:, T - Tq:]).view(B, Tq, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.value_gate is not None:
            gate = 2 * torch.sigmoid(self.value_gate(x[..., :SMEAR_GATE_CHANNELS]))  # [B, T, Hkv]
            v = v + gate[..., None] * value_embed.view(B, T, self.n_kv_head, self.head_dim).to(v.dtype)
        if self.key_smear is not None:  # k_t <- (1 - a) k_t + a k_{t-1}, a = sigmoid(key_smear) per KV head
            before = kv_cache.swap_raw_keys(self.layer_idx, k) if kv_cache is not None else torch.zeros_like(k[:, :1])
            share = torch.sigmoid(self.key_smear).to(k.dtype)[:, None]  # [Hkv, 1]
            k = torch.lerp(k, previous_entries(k, before), share)
        # QK-norm, then rotary: a rotation keeps the norm, so for tokens the order does not matter, and
        # damped tables (MegaContext gists) then really shrink the high-frequency parts of q/k.
        q, k = apply_rotary(norm(q), cos[:, T - Tq:], sin[:, T - Tq:]), apply_rotary(norm(k), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, hd]
        gqa = self.n_kv_head != self.n_head
        past = 0
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.insert(self.layer_idx, k, v)
        if self.window is None and past == 0 and Tq == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif self.window is None and Tq == 1:  # the last position sees every key
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # a query at position p sees keys in (p - window, p]
            key_pos = torch.arange(past + T, device=x.device)
            query_pos = torch.arange(past + T - Tq, past + T, device=x.device)[:, None]
            mask = key_pos <= query_pos
            if self.window is not None:
                mask = mask & (key_pos > query_pos - self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, Tq, -1)
        return self.c_proj(y)


class EmbeddingSmear(nn.Module):
    """Adds gated shares of the previous `taps` entries' normed embeddings to each one (nanochat's smear, taps = 1):
    x_t <- x_t + sum_j scale_j * sigmoid(gate_j . x_t[:C]) * x_{t-j}; the scales start at 0 (no mixing)."""

    def __init__(self, n_embd: int, taps: int):
        super().__init__()
        self.taps, self.channels = taps, min(SMEAR_GATE_CHANNELS, n_embd)
        self.gate = nn.Parameter(torch.zeros(taps * self.channels))  # [taps, C] kept 1-D: AdamW, not Muon
        self.scale = nn.Parameter(torch.zeros(taps))

    def forward(self, x, kv_cache=None):
        """x [B, T, D] normed embeddings -> mixed [B, T, D]."""
        J = self.taps
        before = kv_cache.swap_embeds(x, J) if kv_cache is not None else x.new_zeros(x.size(0), J, x.size(2))
        gate = self.gate.to(x.dtype).view(J, self.channels)
        shares = self.scale.to(x.dtype) * torch.sigmoid(x[..., :self.channels] @ gate.T)  # [B, T, J]
        mixed = x
        for j in range(1, J + 1):  # a handful of taps
            mixed = mixed + shares[..., j - 1:j] * previous_entries(x, before, j)
        return mixed


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

    def forward(self, x, cos, sin, kv_cache=None, value_embed=None, queries: int = 0):
        """queries > 0: only the last that many positions come out (GPT.forward's logits_to_keep, in the last block)."""
        x = x[:, x.size(1) - (queries or x.size(1)):] + self.attn(norm(x), cos, sin, kv_cache, value_embed, queries)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.smear = EmbeddingSmear(config.n_embd, config.smear_taps) if config.smear_embed else None
        # layer scalars: before block i the residual becomes resid_scale[i] x + x0_share[i] x0 (x0: the stack's input,
        # the normed and smeared embedding); backout: the head reads x - share x_mid (x_mid: the input of the middle block)
        self.resid_scale = nn.Parameter(torch.ones(config.n_layer)) if config.layer_scalars else None
        self.x0_share = nn.Parameter(torch.zeros(config.n_layer)) if config.layer_scalars else None
        self.backout_share = nn.Parameter(torch.zeros(1)) if config.backout else None
        kv_dim = config.kv_heads * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.padded_vocab, kv_dim)
                                           for i in range(config.n_layer) if config.has_value_embeds(i)})
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab, bias=False)
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
            if block.attn.key_smear is not None:
                nn.init.zeros_(block.attn.key_smear)  # half the previous key at the start
        if self.smear is not None:
            nn.init.zeros_(self.smear.gate)
            nn.init.zeros_(self.smear.scale)
        if self.resid_scale is not None:  # the plain residual stream at the start
            nn.init.ones_(self.resid_scale)
            nn.init.zeros_(self.x0_share)
        if self.backout_share is not None:
            nn.init.zeros_(self.backout_share)
        for table in self.value_embeds.values():
            nn.init.zeros_(table.weight)
        for block in self.transformer.h:
            if block.attn.value_gate is not None:
                nn.init.zeros_(block.attn.value_gate.weight)
        self._grow_rotary(self._rope_len)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        lookups = self.transformer.wte.weight.numel() + sum(t.weight.numel() for t in self.value_embeds.values())
        return n - lookups if exclude_embedding else n

    def estimate_flops(self, context_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per non-embedding weight plus the attention score/value matmuls over a
        context of context_len (default sequence_len) positions."""
        c = self.config
        context = context_len or c.sequence_len
        attended = sum(min(w or context, context) for w in c.windows)
        return 6 * self.num_params(exclude_embedding=True) + 12 * c.n_embd * attended

    def kept_forward_share(self, n: int, keep: int) -> float:
        """Share of the weight matmuls of an n-position forward that remain with logits_to_keep=keep (the last block's
        keys and values still cover all n positions): for MFU of passes that read only the last logits."""
        last = self.transformer.h[-1]
        head = self.lm_head.weight.numel()
        full = sum(p.numel() for p in self.transformer.h.parameters()) + head
        trimmed = sum(p.numel() for p in last.parameters()) - last.attn.c_k.weight.numel() - last.attn.c_v.weight.numel() + head
        return 1 - trimmed * (1 - min(keep, n) / n) / full

    def default_rope(self, T: int, offset: int = 0):
        """Standard rotary tables for positions [offset, offset+T): each [1, T, 1, hd/2]."""
        if offset + T > self._rope_len:
            self._grow_rotary(max(2 * self._rope_len, offset + T))
        return self.cos[:, offset:offset + T], self.sin[:, offset:offset + T]

    def new_kv_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        dtype = dtype or self.lm_head.weight.dtype
        return KVCache(batch_size, max_len, c.n_layer, c.kv_heads, c.head_dim, self.lm_head.weight.device, dtype,
                       raw_keys=c.smear_keys, embed_dim=c.n_embd if c.smear_embed else 0)

    def forward(self, idx=None, targets=None, *, inputs_embeds=None, token_ids=None, rope=None, kv_cache=None,
                loss_reduction="mean", logits_to_keep: int = 0):
        """Logits [B, T, V] when targets is None, else the loss (scalar, or [B, T] for 'none'). With inputs_embeds and
        value embeddings, token_ids [B, T] says which token each entry is (-1: none, e.g. a gist: no value embedding).
        logits_to_keep > 0: logits of the last that many positions only ([B, n, V]; prefill and evaluation read no
        more). The head and the last block then run over those positions alone (the last block's keys and values
        still cover all, and a KV cache still receives them): at the CPU preset (depth 4, bf16) the head over every
        position was a third of an inference forward; trimming the last block took 16 histories of 2,048 tokens
        from 2.68 to 2.42 s and 64 of 128 from 0.30 to 0.29 s (attention and norms of the other blocks remain)."""
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx or inputs_embeds")
        if logits_to_keep > 0 and targets is not None:
            raise ValueError("logits_to_keep is for inference: the loss needs every position's logits")
        if self.value_embeds and idx is None and token_ids is None:
            raise ValueError("this GPT has value embeddings: inputs_embeds need token_ids (-1 where an entry is no token)")
        x = self.transformer.wte(idx) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if rope is None:
            cos, sin = self.default_rope(T, kv_cache.pos if kv_cache is not None else 0)
        else:
            cos, sin = rope
            if cos.shape[-3] != T or cos.shape[-1] != self.config.head_dim // 2 or cos.shape[0] not in (1, B):
                raise ValueError(f"rope tables must be [B|1, {T}, 1, {self.config.head_dim // 2}], got {tuple(cos.shape)}")
        x = norm(x)
        if self.smear is not None:
            x = self.smear(x, kv_cache)
        x0, middle, last = x, self.config.n_layer // 2, self.config.n_layer - 1
        ids = idx if idx is not None else token_ids
        # the last block computes only the kept positions' queries, attention output and MLP
        queries = logits_to_keep if 0 < logits_to_keep < T else 0
        for i, block in enumerate(self.transformer.h):
            if i == middle:
                x_mid = x
            if self.resid_scale is not None:
                x = self.resid_scale[i].to(x.dtype) * x + self.x0_share[i].to(x.dtype) * x0
            value_embed = None
            if str(i) in self.value_embeds:
                value_embed = self.value_embeds[str(i)](ids.clamp(min=0)) * (ids >= 0)[..., None]
            x = block(x, cos, sin, kv_cache, value_embed, queries if i == last else 0)
        if kv_cache is not None:
            kv_cache.pos += T
        if self.backout_share is not None:
            x = x - self.backout_share.to(x.dtype) * x_mid[:, -x.size(1):]
        x = norm(x)
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss
