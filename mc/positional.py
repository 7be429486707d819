"""Rotary positions of working-context entries (docs/architecture.md §6).

Every WC entry has a global start position `pos` and a span (1 token, K tokens, K**2 tokens).
`wc_rope` turns them into per-row rotary tables `(cos, sin)`, each `[V, W, 1, hd/2]` in fp32, the
`rope=` argument of `nanochat.gpt.GPT.forward`. Modes:

- `gaussian`: the EXPECTED rotation over the positions a span covers. For positions p uniform over
  [pos, pos + span), E[exp(i w p)] = exp(i w c) * sinc-like damping; we use its Gaussian
  approximation: angle w*c at the span centre c = pos + (span-1)/2, damped by exp(-(w*sigma)^2 / 2)
  with sigma^2 = (span^2 - 1)/12, the variance of that uniform distribution. High frequencies
  (w*sigma >> 1) vanish for gists, low ones keep their phase. A token (span 1, sigma 0) gets exactly
  standard RoPE at its position (same op sequence as `nanochat.gpt.rotary_tables`).
- `index`: entries are numbered 0..W-1 along each row like a plain sequence; the LOD of an entry
  is only known from its embedding.

Padding entries (valid False) get the identity rotation (cos 1, sin 0); causal attention never lets
a real entry see them, so this only makes the tables deterministic.
"""

import torch

from nanochat.gpt import rotary_frequencies, rotary_tables

MODES = ("gaussian", "index")
# modes known from the literature that would need cos/sin of another width than hd/2 (e.g. a
# separate rotary axis for the LOD); nanochat.gpt.apply_rotary does not support them
WIDTH_CHANGING_MODES = ("2d", "rope2d", "lod_axis", "multi_axis")


def check_mode(mode: str, head_dim: int):
    """Raise ValueError for an unknown or unsupported positional mode, or an odd head dim."""
    if mode in WIDTH_CHANGING_MODES:
        raise ValueError(f"positional mode {mode!r} would change the width of the rotary tables (hd/2 = "
                         f"{head_dim // 2}), which nanochat.gpt does not support; use one of {MODES}")
    if mode not in MODES:
        raise ValueError(f"unknown positional mode {mode!r} (--mc_positional); choose one of {MODES}")
    if head_dim % 2:
        raise ValueError(f"positional mode {mode!r} needs an even head dim, got {head_dim}")


def wc_rope(pos, span, lod, valid, head_dim: int, mode: str, base: float = 10000.0):
    """Per-row rotary tables for WC entries: pos/span/lod/valid [V, W] -> (cos, sin) each [V, W, 1, hd/2] fp32.

    `lod` is accepted for modes that key on it; `gaussian` reads the span, `index` only the layout.
    """
    check_mode(mode, head_dim)
    V, W = pos.shape
    if mode == "index":
        index = torch.where(valid, torch.arange(W, device=pos.device), 0)  # [V, W]; padding at angle 0
        cos, sin = rotary_tables(index, head_dim, base)
    else:
        span_f = span.float()  # [V, W]
        centre = torch.where(valid, pos.float() + (span_f - 1) / 2, 0.0)  # [V, W]; == pos exactly for tokens
        var = torch.where(valid, (span_f.square() - 1) / 12, 0.0)  # [V, W], variance of a uniform over the span
        omega = rotary_frequencies(head_dim, base, pos.device)  # [hd/2]
        angles = centre.unsqueeze(-1) * omega  # [V, W, hd/2]
        damp = torch.exp(var.unsqueeze(-1) * (-0.5 * omega.square()))  # exp(-(omega sigma)^2 / 2); 1 for tokens
        cos, sin = angles.cos() * damp, angles.sin() * damp
    return cos.unsqueeze(2), sin.unsqueeze(2)
