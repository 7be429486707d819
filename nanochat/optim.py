"""Optimizers: Muon for the 2-D matrices inside blocks, AdamW for embeddings, the LM head and the rest.

Muon orthogonalises each matrix's momentum with a few Newton-Schulz iterations, which makes
updates of equal "size" in every direction; embeddings and the head are lookups/readouts and
keep AdamW. Learning rates of the AdamW groups scale as 1/sqrt(width/768) so one set of
defaults works across the depth dial.

Distributed: gradients are averaged across ranks (coalesced all-reduce) before each step, so
every rank applies the identical update and the replicas never drift apart.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@torch.no_grad()
def orthogonalize(G, steps: int = 5, dtype=None):
    """Approximate the orthogonal polar factor U V^T of G [..., m, n] with a quintic Newton-Schulz iteration, in
    dtype (None: bf16 on CUDA, fp32 elsewhere)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype or (torch.bfloat16 if G.is_cuda else torch.float32))
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """SGD-momentum (Nesterov) whose update for each 2-D parameter is orthogonalised.

    `stack` (default: on CUDA): orthogonalise all matrices of one shape as one batch. On CUDA a step is otherwise
    launch-bound, ~100 small kernels per matrix (d12 + MC nets on an H200: 81 ms -> 10 ms a step); on CPU it
    gained nothing (fp32, the CPU preset's 62 matrices: 243-278 ms stacked vs 247-253 ms one at a time).
    `ns_dtype`: the Newton-Schulz iteration's dtype (None: bf16 on CUDA, fp32 elsewhere); the trainers pass their
    autocast dtype, so a CPU with fast bf16 matmuls orthogonalises in bf16 too (CPU preset's GPT matrices on a
    2-core AVX512-BF16 EPYC: 169 ms fp32 -> 93 ms bf16 a step), as CUDA always has."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, stack: bool | None = None,
                 ns_dtype=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        self.stack, self.ns_dtype = stack, ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
            grads = [p.grad for p in params]
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
            updates = torch._foreach_lerp(grads, bufs, group["momentum"]) if group["nesterov"] else bufs
            stack = params[0].is_cuda if self.stack is None else self.stack
            batches = {}
            for i, p in enumerate(params):
                batches.setdefault((p.shape, p.dtype) if stack else i, []).append(i)
            for idx in batches.values():
                shape = params[idx[0]].shape
                ortho = orthogonalize(torch.stack([updates[i] for i in idx]), group["ns_steps"], self.ns_dtype)
                scale = max(1.0, shape[-2] / shape[-1]) ** 0.5
                torch._foreach_add_([params[i] for i in idx], list(ortho.unbind(0)), alpha=-group["lr"] * scale)


def split_params(modules):
    """Partition parameters into (2-D matrices for Muon, token embeddings (input and value), LM head, the rest for AdamW)."""
    lookup_tables = {id(m.weight) for mod in modules for m in mod.modules() if isinstance(m, nn.Embedding)}
    matrices, embedding, head, other = [], [], [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if name == "transformer.wte.weight" or name.startswith("value_embeds."):
                embedding.append(p)
            elif name.startswith("lm_head"):
                head.append(p)
            elif p.ndim == 2 and id(p) not in lookup_tables:
                matrices.append(p)
            else:
                other.append(p)
    return matrices, embedding, head, other


def build_optimizers(model, extra_modules=(), adam_modules=(), *, matrix_lr=0.02, embedding_lr=0.2,
                     unembedding_lr=0.004, other_lr=0.003, weight_decay=0.0, ns_dtype=None):
    """[AdamW, Muon] over the GPT plus any extra modules (e.g. the MegaContext nets); ns_dtype: Muon's.

    adam_modules: modules trained by AdamW alone (their matrices at other_lr): for small side nets whose
    Newton-Schulz iterations would cost more than their forward and backward. Muon is left out when no
    matrix is left for it. Every param group remembers its `initial_lr` so the training loop can apply a schedule.
    """
    width_scale = (model.config.n_embd / 768) ** -0.5
    matrices, embedding, head, other = split_params([model, *extra_modules])
    other = other + [p for module in adam_modules for p in module.parameters() if p.requires_grad]
    adam_groups = [
        dict(params=embedding, lr=embedding_lr * width_scale),
        dict(params=head, lr=unembedding_lr * width_scale),
        dict(params=other, lr=other_lr),
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    optimizers = [torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)]
    if matrices:
        optimizers.append(Muon(matrices, lr=matrix_lr, ns_dtype=ns_dtype))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


@torch.no_grad()
def allreduce_grads(params, bucket_numel: int = 2**25):
    """Average gradients across ranks in a few coalesced all-reduces (no-op when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    buckets, bucket, size = [], [], 0
    for g in grads:
        if bucket and (size + g.numel() > bucket_numel or g.dtype != bucket[0].dtype):
            buckets.append(bucket)
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel()
    if bucket:
        buckets.append(bucket)
    world = dist.get_world_size()
    for bucket in buckets:
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        flat.div_(world)
        for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(synced)


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """The LR schedule as a multiple of each group's initial LR: linear warmup over warmup_ratio of the steps,
    constant, then linear decay over the last warmdown_ratio of the steps to final_lr_frac."""
    warmup, warmdown = round(warmup_ratio * num_iterations), round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def set_lr(optimizers, multiplier: float, muon_momentum: float | None = None):
    """Every param group's LR = its initial LR x multiplier; Muon's momentum too when given."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
            if muon_momentum is not None and isinstance(opt, Muon):
                group["momentum"] = muon_momentum


def optimizer_step(optimizers, params: list, grad_clip: float):
    """One update: average the gradients over ranks, clip their global norm (0: no clipping), step every
    optimizer, then drop the gradients."""
    allreduce_grads(params)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    for opt in optimizers:
        opt.step()
    for p in params:
        p.grad = None
