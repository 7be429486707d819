"""LensNet: focus scores for the entries of working contexts (docs/architecture.md §5).

Input: V working contexts of up to W entries, right-padded (`valid` may in fact be any mask, e.g. only
the entries before the point where the focus is decided, mc.runtime.visible_entries):
    embeds [V, W, D] (detached by the caller), lod [V, W] long (0 = token, 1, 2 = gists),
    rel_pos [V, W] float (tokens between the entry and the end of the history), valid [V, W] bool.
Output: scores [V, W] fp32, 0 where invalid; higher = more worth showing in full. The scores are
relative: LensNet is trained with a softmax over the units it could expand (mc.runtime), and the
allocator spends the budget on the best of them.

Architecture (C = cfg.lens_width):
    h = in_proj(norm(embeds)) + lod_emb[lod] + pos_mlp(fourier(log1p(rel_pos)))       [V, W, C]
    h = lens_layers bidirectional transformer blocks, key-padding mask = valid         (non-causal)
    tail = the last `tail_len` valid entries of each row (the raw recent tokens: the query)
    c = cross-attention: every entry's query attends over the tail entries' states    [V, W, C]
    score = w . relu^2(score_fc(norm(h + c_proj(c))))                                  [V, W]
The tail conditions each score twice: through the body's bidirectional attention and explicitly
through the cross-attention, which lets an entry compare itself with specific recent tokens (what
the model is about to predict) rather than with one pooled vector. The score vector `w` starts at
zero, so initial scores are exactly 0 and the first allocations are uniform; the first update
moves `w`, after which gradients reach every parameter.
With cfg.lens_match the caller adds to each LOD1 gist's score the question match of its block (`match`):
a gist is one vector for K tokens, so a rare key among them is easily lost; the match compares the block's
tokens themselves (the GPT's token embeddings, detached) with the last R tokens before the focus is decided:
    match(b) = s * sum_r g_r relu(max_i cos(P e_r, P e_(b,i)) - tau) / (1 - tau),  i over b's tokens older than the question
one projection P for both sides (a token matches itself from the start), a learned weight g_r of each
question token (softplus of a linear gate: which words are worth matching, e.g. not "the"), tau = 0.5, and the
scale s starting at 0 (no effect until the loss moves it). Measured in docs/architecture.md §5.
Learned vectors are 1-D and tables are nn.Embedding (AdamW in nanochat.optim), matrices go to
Muon. dtype: inputs are cast to the module's dtype (set by the caller, `aux_dtype`).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from mc.config import MCConfig
from mc.gistnet import EncoderBlock, init_linear, num_heads
from mc.working_context import tail_mask
from nanochat.gpt import norm

N_FREQ = 8  # Fourier frequencies of log1p(rel_pos): 2^-4 .. 2^3
MATCH_DIM = 64  # width of the question match's token projection
MATCH_TAU = 0.5  # cosine a token pair must exceed to count as a match
MATCH_CHUNK = 4096  # blocks matched at once (bounds the [B, blocks, K, R] similarity tensor)


def key_mask(keys):
    """keys [V, W] bool -> SDPA mask [V, 1, 1, W]; a row with no key attends everywhere (no NaN)."""
    return (keys | ~keys.any(-1, keepdim=True))[:, None, None, :]


class LensNet(nn.Module):
    def __init__(self, cfg: MCConfig, d_model: int):
        super().__init__()
        self.cfg, self.d_model = cfg, d_model
        C = cfg.lens_width
        self.n_head = num_heads(C)
        self.in_proj = nn.Linear(d_model, C, bias=False)
        self.lod_emb = nn.Embedding(cfg.max_lod + 1, C)
        self.register_buffer("freqs", 2.0 ** torch.arange(-4, N_FREQ - 4, dtype=torch.float32), persistent=False)
        self.pos_fc = nn.Linear(2 * N_FREQ, C, bias=False)
        self.pos_proj = nn.Linear(C, C, bias=False)
        self.blocks = nn.ModuleList([EncoderBlock(C) for _ in range(cfg.lens_layers)])
        self.x_q = nn.Linear(C, C, bias=False)
        self.x_k = nn.Linear(C, C, bias=False)
        self.x_v = nn.Linear(C, C, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.score_fc = nn.Linear(C, 4 * C, bias=False)
        self.score_w = nn.Parameter(torch.empty(4 * C))
        if cfg.lens_match:
            self.match_proj = nn.Linear(d_model, MATCH_DIM, bias=False)
            self.match_gate = nn.Parameter(torch.empty(d_model))  # 1-D: AdamW
            self.match_bias = nn.Parameter(torch.empty(1))
            self.match_scale = nn.Parameter(torch.empty(1))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        nn.init.normal_(self.lod_emb.weight, std=1.0)
        for lin in (self.in_proj, self.pos_fc, self.pos_proj, self.x_q, self.x_k, self.x_v, self.c_proj, self.score_fc):
            init_linear(lin)
        for block in self.blocks:
            block.init_weights()
        nn.init.zeros_(self.score_w)  # initial scores are exactly 0
        if self.cfg.lens_match:
            init_linear(self.match_proj)
            for p in (self.match_gate, self.match_bias, self.match_scale):
                nn.init.zeros_(p)  # every question token weighs softplus(0); the match starts without effect

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def summary(self) -> str:
        c = self.cfg
        match = ", question match" if c.lens_match else ""
        return f"LensNet(width {c.lens_width}, {c.lens_layers} layers{match}, D={self.d_model}): {self.num_params():,} params"

    def forward(self, embeds, lod, rel_pos, valid, tail_len=None):
        """embeds [V, W, D], lod [V, W], rel_pos [V, W], valid [V, W] bool, tail_len int | [V] (None = cfg.recent) -> [V, W] fp32."""
        dtype = self.lod_emb.weight.dtype
        tail_len = self.cfg.recent if tail_len is None else tail_len
        x = torch.where(valid.unsqueeze(-1), embeds.to(dtype), torch.zeros((), dtype=dtype, device=embeds.device))
        lod = torch.where(valid, lod.long(), 0).clamp(0, self.cfg.max_lod)  # [V, W]
        u = torch.log1p(rel_pos.float().clamp(min=0)).unsqueeze(-1) * self.freqs  # [V, W, N_FREQ]
        fourier = torch.cat([u.sin(), u.cos()], dim=-1).to(dtype)  # [V, W, 2*N_FREQ]
        h = self.in_proj(norm(x)) + self.lod_emb(lod) + self.pos_proj(F.relu(self.pos_fc(fourier)).square())
        body_mask = key_mask(valid)  # [V, 1, 1, W]
        for block in self.blocks:
            h = block(h, body_mask)  # [V, W, C]
        c = self.attend_tail(h, key_mask(tail_mask(valid, tail_len)))  # [V, W, C]
        z = F.relu(self.score_fc(norm(h + self.c_proj(c)))).square()  # [V, W, 4C]
        scores = (z * self.score_w).sum(-1).float()  # [V, W]
        return torch.where(valid, scores, 0.0)

    def attend_tail(self, h, tail_keys):
        """Every entry of h [V, W, C] attends over the tail entries (tail_keys [V, 1, 1, W]) -> [V, W, C]."""
        V, W, C = h.shape
        H = self.n_head
        hn = norm(h)
        q, k, v = (lin(hn).view(V, W, H, C // H).transpose(1, 2) for lin in (self.x_q, self.x_k, self.x_v))
        y = F.scaled_dot_product_attention(norm(q), norm(k), v, attn_mask=tail_keys)  # [V, H, W, hd]
        return y.transpose(1, 2).reshape(V, W, C)

    def match(self, lod0, focus_end=None):
        """The question match [B, n] fp32 of every block of histories with token embeddings lod0 [B, T, D] (detached
        by the caller; n = T // K): the question = the R tokens before focus_end [B] (None: the end). Only block
        tokens older than the question count: a question token matching itself would make the blocks it lies in
        look like answers, and LensNet's body learns to push the most recent old blocks down to undo that."""
        B, T, D = lod0.shape
        K, R, dtype = self.cfg.block_size, self.cfg.recent, self.match_proj.weight.dtype
        end = torch.full((B,), T, device=lod0.device) if focus_end is None else focus_end.to(lod0.device)
        at = end[:, None] - R + torch.arange(R, device=lod0.device)  # [B, R] question positions
        question = norm(lod0.gather(1, at.clamp(min=0)[..., None].expand(B, R, D)).to(dtype))  # [B, R, D]
        weight = F.softplus(question @ self.match_gate + self.match_bias) * (at >= 0)  # [B, R]
        q = norm(self.match_proj(question))  # [B, R, M]
        n = T // K
        out = []
        for first in range(0, n, MATCH_CHUNK):
            last = min(n, first + MATCH_CHUNK)
            tokens = lod0[:, first * K:last * K].to(dtype)
            k = norm(self.match_proj(norm(tokens))).view(B, -1, K, MATCH_DIM)  # [B, c, K, M]
            pos = torch.arange(first * K, last * K, device=lod0.device).view(1, -1, 1, K)
            older = pos < (end - R).view(B, 1, 1, 1)  # [B, c, 1, K] block tokens before the question
            cos = torch.einsum("bckm,brm->bcrk", k, q) / MATCH_DIM  # [B, c, R, K] (RMS-normed vectors)
            best = cos.masked_fill(~older, -1.0).amax(-1)  # [B, c, R]
            out.append((F.relu(best - MATCH_TAU) * weight[:, None]).sum(-1))
        matched = torch.cat(out, 1) if out else lod0.new_zeros(B, 0, dtype=dtype)
        return (self.match_scale * matched).float() / (1 - MATCH_TAU)
