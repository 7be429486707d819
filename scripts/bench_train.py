"""Benchmark: training tokens/s and MFU in every fast-path setting, and KV-cache decoding vs recompute, in one run.

Training is timed in each setting of --settings (fp32 or bf16 autocast, eager or torch.compile), each as a
ratio to fp32 eager; the setting base_train's defaults pick here (--cpu_bf16=auto, --compile=auto for a
long run) is marked, with issue 12's target for it: >= 1.5x fp32 eager on CPU. MFU = model FLOP/s
(estimate_flops x tokens/s) / matmul FLOP/s of this device in that setting's dtype, measured in the same
process, so the ratio means the same on a laptop CPU and on an H100. Compiling takes ~15 s a setting on this 2-core CPU.

    python -m scripts.bench_train                       # the CPU preset model (depth 4, seq 512)
    python -m scripts.bench_train --depth=12 --seq_len=2048 --batch_size=16 --settings=bf16+compile
"""

import argparse
import time

import torch

from nanochat.common import (CPU_BF16_CHOICES, CPU_COMPILE_MIN_STEPS, autocast_ctx, autocast_dtype, compute_init,
                             measure_matmul_flops, synchronize, use_compile)
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


SETTINGS = ["fp32", "bf16", "fp32+compile", "bf16+compile"]
TARGET_SPEEDUP = 1.5  # issue 12: the default setting's CPU training >= 1.5x fp32 eager


def parse_settings(spec: str) -> list[str]:
    settings = [name.strip() for name in spec.split(",") if name.strip()]
    if not settings or any(name not in SETTINGS for name in settings):
        raise ValueError(f"--settings: a comma-separated subset of {','.join(SETTINGS)}, got {spec!r}")
    return settings


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=checked_number(int, 1), default=4, help="model depth (width = 64 x depth)")
    parser.add_argument("--seq_len", type=checked_number(int, 2), default=512, help="training sequence length")
    parser.add_argument("--batch_size", type=checked_number(int, 1), default=8, help="sequences per step")
    parser.add_argument("--vocab_size", type=checked_number(int, 2), default=4096, help="vocabulary size")
    parser.add_argument("--steps", type=checked_number(int, 1), default=5, help="timed training steps per setting")
    parser.add_argument("--decode_tokens", type=checked_number(int, 1), default=64, help="tokens decoded in the decode benchmark")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"training settings to time, comma-separated from {','.join(SETTINGS)} (fp32 eager always)")
    parser.add_argument("--cpu_bf16", default="auto", choices=CPU_BF16_CHOICES, help="the decode benchmark's autocast on CPU")
    parser.add_argument("--device_type", default="", help="cuda|mps|cpu (empty = autodetect)")
    args = parser.parse_args(argv)
    try:
        settings = parse_settings(args.settings)
    except ValueError as e:
        parser.error(str(e))
    settings = ["fp32"] + [name for name in settings if name != "fp32"]

    _, _, _, _, device = compute_init(args.device_type)
    dtype = autocast_dtype(device.type, args.cpu_bf16)
    amp = lambda: autocast_ctx(device.type, dtype)  # noqa: E731
    config = GPTConfig.from_depth(args.depth, sequence_len=args.seq_len, vocab_size=args.vocab_size)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    default = ("bf16" if autocast_dtype(device.type, "auto") is not None else "fp32") + \
        ("+compile" if use_compile(device.type, "auto", CPU_COMPILE_MIN_STEPS) else "")

    def measure(setting: str) -> dict:
        """({tokens_per_s, step_s, first_s (the warm-up step, compile included), mfu}, the model) of the training step
        in one setting (a fresh model each time)."""
        torch.manual_seed(0)
        model = GPT(config).to(device)
        model.init_weights()
        setting_dtype = torch.bfloat16 if setting.startswith("bf16") else None
        optimizers = build_optimizers(model, ns_dtype=setting_dtype)
        train_model = torch.compile(model, dynamic=False) if setting.endswith("+compile") else model

        def train_step():
            with autocast_ctx(device.type, setting_dtype):
                loss = train_model(x, x)
            loss.backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        step_s = timed(train_step, device, args.steps)
        first_s = time.perf_counter() - t0 - step_s * args.steps  # the warm-up step, compile included
        tokens_per_s = args.batch_size * args.seq_len / step_s
        mfu = model.estimate_flops() * tokens_per_s / measure_matmul_flops(device, setting_dtype)
        return {"tokens_per_s": tokens_per_s, "step_s": step_s, "first_s": first_s, "mfu": mfu}, model

    results = {}
    for setting in settings:
        print(f"timing {setting} ...", flush=True)
        results[setting], model = measure(setting)
    base = results["fp32"]["tokens_per_s"]
    print(f"device {device}, model depth {args.depth} ({model.num_params():,} params), batch {args.batch_size} x {args.seq_len}")
    print(f"{'training setting':24s}{'tokens/s':>12s}{'ms/step':>10s}{'1st step s':>12s}{'MFU':>8s}{'vs fp32':>10s}")
    for setting, r in results.items():
        mark = "  <- default here" if setting == default else ""
        print(f"{setting:24s}{r['tokens_per_s']:12,.0f}{1000 * r['step_s']:10.0f}{r['first_s']:12.1f}{r['mfu']:8.3f}"
              f"{r['tokens_per_s'] / base:9.2f}x{mark}")
    if default in results and device.type == "cpu":
        speedup = results[default]["tokens_per_s"] / base
        print(f"default setting vs fp32 eager: {speedup:.2f}x (target >= {TARGET_SPEEDUP}x)  "
              f"{'PASS' if speedup >= TARGET_SPEEDUP else 'MISS'}")

    model.eval()
    context = x[:1, : args.seq_len // 2]
    n = args.decode_tokens

    @torch.no_grad()
    def decode_cached():
        cache = model.new_kv_cache(1, context.size(1) + n + 1)
        with amp():
            logits = model(context, kv_cache=cache, logits_to_keep=1)
            for _ in range(n):
                logits = model(logits[:, -1:].argmax(-1), kv_cache=cache)

    @torch.no_grad()
    def decode_recompute():
        ids = context
        with amp():
            for _ in range(n):
                ids = torch.cat([ids, model(ids, logits_to_keep=1).argmax(-1)], dim=1)

    cached_s = timed(decode_cached, device, 2)
    recompute_s = timed(decode_recompute, device, 2)

    print(f"decode: autocast {dtype}")
    print(f"decode with KV cache        {n / cached_s:10,.1f} tokens/s   (context {context.size(1)})")
    print(f"decode by recompute         {n / recompute_s:10,.1f} tokens/s")
    print(f"KV cache speed-up           {recompute_s / cached_s:10.2f}x")
    return {"settings": results, "default": default, "kv_speedup": recompute_s / cached_s}


if __name__ == "__main__":
    main()
