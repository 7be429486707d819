"""Bits per byte: the tokenizer-independent validation metric.

Per-token losses (nats) are summed and divided by the UTF-8 bytes those target tokens stand for;
special tokens (0 bytes) and ignored targets (-1) count for neither. Summed over all ranks.
"""

import itertools
import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int | None, token_bytes, autocast_ctx) -> float:
    """Average bits per byte of `model` over `steps` (x, y) batches (None = all of them); token_bytes [V] int on
    the model's device."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in itertools.islice(batches, steps):
        with autocast_ctx:
            loss = model(x, y, loss_reduction="none")  # [B, T]
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], 0)
        total_nats += (loss * (nbytes > 0)).sum().double()
        total_bytes += nbytes.sum()
    if dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
