"""Benchmark: training tokens/s and MFU, and KV-cache decoding vs recompute, measured in one run.

MFU = model FLOP/s (estimate_flops x tokens/s) / matmul FLOP/s of this device, measured here in the
same process with the same dtype, so the ratio means the same on a laptop CPU and on an H100.

    python -m scripts.bench_train                       # the CPU preset model (depth 4, seq 512)
    python -m scripts.bench_train --depth=12 --seq_len=2048 --batch_size=16 --compile
"""

import argparse
import time

import torch

from nanochat.common import CPU_BF16_CHOICES, autocast_ctx, autocast_dtype, compute_init, measure_matmul_flops, synchronize
from nanochat.configurator import FlagParser, checked_number
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizers


def timed(fn, device, repeats: int):
    """Mean seconds of fn() over `repeats` runs, after one warm-up run."""
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / repeats


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=checked_number(int, 1), default=4, help="model depth (width = 64 x depth)")
    parser.add_argument("--seq_len", type=checked_number(int, 2), default=512, help="training sequence length")
    parser.add_argument("--batch_size", type=checked_number(int, 1), default=8, help="sequences per step")
    parser.add_argument("--vocab_size", type=checked_number(int, 2), default=4096, help="vocabulary size")
    parser.add_argument("--steps", type=checked_number(int, 1), default=5, help="timed training steps")
    parser.add_argument("--decode_tokens", type=checked_number(int, 1), default=64, help="tokens decoded in the decode benchmark")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training model (CUDA)")
    parser.add_argument("--cpu_bf16", default="auto", choices=CPU_BF16_CHOICES, help="bf16 autocast on CPU (auto: where faster than fp32)")
    parser.add_argument("--device_type", default="", help="cuda|mps|cpu (empty = autodetect)")
    args = parser.parse_args(argv)

    _, _, _, _, device = compute_init(args.device_type)
    dtype = autocast_dtype(device.type, args.cpu_bf16)
    amp = lambda: autocast_ctx(device.type, dtype)  # noqa: E731
    torch.manual_seed(0)
    config = GPTConfig.from_depth(args.depth, sequence_len=args.seq_len, vocab_size=args.vocab_size)
    model = GPT(config).to(device)
    model.init_weights()
    optimizers = build_optimizers(model)
    train_model = torch.compile(model, dynamic=False) if args.compile else model
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)

    def train_step():
        with amp():
            loss = train_model(x, x)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    peak = measure_matmul_flops(device, dtype)
    step_s = timed(train_step, device, args.steps)
    tokens_per_s = args.batch_size * args.seq_len / step_s
    mfu = model.estimate_flops() * tokens_per_s / peak

    model.eval()
    context = x[:1, : args.seq_len // 2]
    n = args.decode_tokens

    @torch.no_grad()
    def decode_cached():
        cache = model.new_kv_cache(1, context.size(1) + n + 1)
        with amp():
            logits = model(context, kv_cache=cache)
            for _ in range(n):
                logits = model(logits[:, -1:].argmax(-1), kv_cache=cache)

    @torch.no_grad()
    def decode_recompute():
        ids = context
        with amp():
            for _ in range(n):
                ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)

    cached_s = timed(decode_cached, device, 2)
    recompute_s = timed(decode_recompute, device, 2)

    print(f"device {device}, autocast {dtype}, model depth {args.depth} ({model.num_params():,} params), "
          f"batch {args.batch_size} x {args.seq_len}")
    print(f"matmul peak (measured)      {peak / 1e9:10.1f} GFLOP/s")
    print(f"training                    {tokens_per_s:10,.0f} tokens/s   ({step_s * 1000:.0f} ms/step)")
    print(f"MFU                         {mfu:10.3f}")
    print(f"decode with KV cache        {n / cached_s:10,.1f} tokens/s   (context {context.size(1)})")
    print(f"decode by recompute         {n / recompute_s:10,.1f} tokens/s")
    print(f"KV cache speed-up           {recompute_s / cached_s:10.2f}x")
    return {"tokens_per_s": tokens_per_s, "mfu": mfu, "kv_speedup": recompute_s / cached_s}


if __name__ == "__main__":
    main()
