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

Histories longer than the GPT was trained on (`max_len` = its sequence_len): a gist tree holds any
history in W entries, but rotary distances past the training length are ones the GPT never saw (at the
CPU preset, the oracle arm's needle exact match at 16·W rose from 0.66 to 0.85 with this). So each
WC is laid out in a frame: `frame` = the newest position it may hold (the newest entry's last token,
rounded up to a multiple of max_len/8 minus one, so a session's frame moves in steps, not at every
token). When frame >= max_len, positions within max_len/2 of the frame stay exact, and older ones
(centres and spreads) are scaled linearly into the remaining max_len/2, so no two entries lie
max_len or more apart: position interpolation of the far part only, the near part untouched. Tokens
appended later at their own positions stay exact, which is what lets a session decode with standard
rotary rows and reuse its cache until the frame moves. Histories within max_len are not changed at all
(training never sees a compressed frame).
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


def rope_frame(last, max_len: int):
    """Frame of a WC whose newest position is `last` (int or tensor): the next multiple of max_len/8, minus one."""
    step = max(max_len // 8, 1)
    return (last + step) // step * step - 1


def compress_far(centre, var, frame, max_len: int):
    """Centres/variances [V, W] laid out in frame [V] (see the module docstring): positions older than
    frame - max_len/2 are scaled into the max_len/2 below that; rows with frame < max_len unchanged."""
    keep = max_len // 2
    start = (frame - keep + 1).float()[:, None]  # [V, 1]: positions >= start stay exact
    scale = (max_len - keep) / start.clamp_min(1)  # [V, 1], < 1 where the frame is compressed
    far = (frame >= max_len)[:, None] & (centre < start)  # [V, W]
    return torch.where(far, start - (start - centre) * scale, centre), torch.where(far, var * scale.square(), var)


def wc_rope(pos, span, lod, valid, head_dim: int, mode: str, base: float = 10000.0, max_len: int = 0, frame=None):
    """Per-row rotary tables for WC entries: pos/span/lod/valid [V, W] -> (cos, sin) each [V, W, 1, hd/2] fp32.

    `lod` is accepted for modes that key on it; `gaussian` reads the span, `index` only the layout.
    max_len > 0 (the GPT's training length) lays each row out in its frame (frame [V] long, default
    `rope_frame` of the row's newest position): distances stay below max_len however long the history.
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
        if max_len > 0:
            if frame is None:
                frame = rope_frame(torch.where(valid, pos + span - 1, 0).amax(dim=1), max_len)  # [V]
            centre, var = compress_far(centre, var, frame, max_len)
        omega = rotary_frequencies(head_dim, base, pos.device)  # [hd/2]
        angles = centre.unsqueeze(-1) * omega  # [V, W, hd/2]
        damp = torch.exp(var.unsqueeze(-1) * (-0.5 * omega.square()))  # exp(-(omega sigma)^2 / 2); 1 for tokens
        cos, sin = angles.cos() * damp, angles.sin() * damp
    return cos.unsqueeze(2), sin.unsqueeze(2)
