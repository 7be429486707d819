"""Benchmark: a MegaContext training step vs a plain one over the same number of GPT entries (docs/architecture.md §12).

The plain step trains B sequences of T tokens (B*T entries). The MC step trains B_mc sequences of the
same length T, each as 1 + N working contexts of W entries, with B_mc (1 + N) W = B T: the batched
GPT forward sees the same number of entries, and each step consumes B_mc*T data tokens. Reported,
all measured in this one run on this machine (medians over --steps steps, steps of the two kinds
interleaved so background load hits both alike):

  (a) MC step time / plain step time                  target <= 1.10 (the controller adds <= 10 %)
  (b) orchestration overhead share of the MC step       target <= 5 %
      = MC step - (GPT fwd+bwd + GistNet fwd+bwd + LensNet fwd(+bwd) + optimizer), each net timed
      alone on exactly the inputs it sees inside the MC step
  (c) data tokens/s with MC / without                   target >= 0.8
  (d) peak memory of each mode, each in a fresh subprocess (CUDA: max_memory_allocated; CPU: peak RSS
      of the steps, VmHWM, and its growth over the RSS just before the first step)

    python -m scripts.bench_mc                                  # the CPU preset (depth 4, T=512, W=128)
    python -m scripts.bench_mc --depth=12 --seq_len=2048 --wc_budget=512 --recent=128 --batch_size=16
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from mc.build import build_controller
from mc.config import MCConfig
from mc.runtime import MCController
from mc.tree import build_tree
from mc.working_context import materialize, most_compressed_map
from nanochat.common import CPU_BF16_CHOICES, autocast_ctx, autocast_dtype, compute_init, synchronize
from nanochat.configurator import FlagParser, checked_number
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizers

TARGETS = {"step_ratio": 1.10, "overhead_share": 0.05, "tokens_ratio": 0.8}  # issue 12


def parse_args(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=checked_number(int, 1), default=4, help="model depth (width = 64 x depth)")
    parser.add_argument("--seq_len", type=checked_number(int, 2), default=512, help="T: tokens per sequence (the MC history)")
    parser.add_argument("--batch_size", type=checked_number(int, 1), default=8, help="B: sequences of the plain step")
    parser.add_argument("--vocab_size", type=checked_number(int, 2), default=4096, help="vocabulary size")
    parser.add_argument("--block_size", type=checked_number(int, 2), default=32, help="K (--mc_block_size)")
    parser.add_argument("--wc_budget", type=checked_number(int, 4), default=128, help="W (--mc_wc_budget)")
    parser.add_argument("--recent", type=checked_number(int, 1), default=32, help="R (--mc_recent)")
    parser.add_argument("--horizon", type=checked_number(int, 1), default=32, help="H (--mc_horizon)")
    parser.add_argument("--num_variants", type=checked_number(int, 1), default=3, help="N (--mc_num_variants)")
    parser.add_argument("--partial_gists", action=argparse.BooleanOptionalAction, default=MCConfig.partial_gists,
                        help="--mc_partial_gists")
    gist_types = MCConfig.__dataclass_fields__["gist_type"].metadata["choices"]
    parser.add_argument("--gist_type", choices=gist_types, default=MCConfig.gist_type, help="GistNet body (--mc_gist_type)")
    parser.add_argument("--gist_layers", type=checked_number(int, 1), default=MCConfig.gist_layers,
                        help="GistNet layers (--mc_gist_layers)")
    parser.add_argument("--gist_mlp_ratio", type=checked_number(int, 1), default=MCConfig.gist_mlp_ratio,
                        help="GistNet's MLP width / model width (--mc_gist_mlp_ratio)")
    parser.add_argument("--gist_optimizer", choices=MCConfig.__dataclass_fields__["gist_optimizer"].metadata["choices"],
                        default=MCConfig.gist_optimizer, help="optimizer of GistNet's matrices (--mc_gist_optimizer)")
    parser.add_argument("--steps", type=checked_number(int, 1), default=6, help="timed steps of each kind")
    parser.add_argument("--warmup", type=checked_number(int, 0), default=2, help="untimed warm-up steps of each kind")
    parser.add_argument("--device_type", default="", help="cuda|mps|cpu (empty = autodetect)")
    parser.add_argument("--cpu_bf16", default="auto", choices=CPU_BF16_CHOICES, help="bf16 autocast on CPU (auto: where faster than fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the GPT (both modes)")
    parser.add_argument("--threads", type=checked_number(int, 0), default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time, robust to other processes on a "
                             "shared CPU (use with --threads=1: idle OpenMP threads spin)")
    parser.add_argument("--stat", choices=["median", "min"], default="median", help="summary of the timed steps")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--probe", choices=["plain", "mc"], default=None, help=argparse.SUPPRESS)  # memory child
    return parser.parse_args(argv)


class Bench:
    """Model, MC controller, optimizers, inputs and the step functions of both modes."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        dtype = autocast_dtype(device.type, args.cpu_bf16)
        self.amp = lambda: autocast_ctx(device.type, dtype)  # noqa: E731
        torch.manual_seed(0)
        B, T, N, W = args.batch_size, args.seq_len, args.num_variants, args.wc_budget
        if (B * T) % ((1 + N) * W):
            raise SystemExit(f"error: B*T = {B * T} is not a multiple of (1 + N) * W = {(1 + N) * W}; "
                             "pick --batch_size/--seq_len/--num_variants/--wc_budget so the entries match")
        self.B_mc = B * T // ((1 + N) * W)
        self.model = GPT(GPTConfig.from_depth(args.depth, sequence_len=T, vocab_size=args.vocab_size)).to(device)
        self.model.init_weights()
        self.cfg = MCConfig(block_size=args.block_size, wc_budget=W, recent=args.recent, horizon=args.horizon,
                            num_variants=N, gist_type=args.gist_type, gist_layers=args.gist_layers,
                            gist_mlp_ratio=args.gist_mlp_ratio, partial_gists=args.partial_gists,
                            gist_optimizer=args.gist_optimizer)
        self.controller = build_controller(self.model, self.cfg)
        with torch.no_grad():  # mid-training state: zero-initialised outputs get values (timing is value-free)
            for module in (self.model, *self.controller.modules().values()):
                for p in module.parameters():
                    if p.abs().sum() == 0:
                        p.normal_(std=0.02)
        self.nets = list(self.controller.modules().values())
        self.opt_plain = build_optimizers(self.model, ns_dtype=dtype)
        self.opt_mc = build_optimizers(self.model, *self.controller.optimizer_split(), ns_dtype=dtype)
        self.fwd = torch.compile(self.model, dynamic=False) if args.compile else self.model
        g = torch.Generator().manual_seed(0)
        rows = torch.randint(0, args.vocab_size, (B, T + 1), generator=g).to(device)
        self.x, self.y = rows[:, :-1], rows[:, 1:]
        self.xm, self.ym = self.x[:self.B_mc], self.y[:self.B_mc]
        self.mc_step_index = 0

    def zero_grad(self):
        for module in (self.model, *self.nets):
            module.zero_grad(set_to_none=True)

    # ---- the two training steps ------------------------------------------------------------------

    def plain_step(self):
        with self.amp():
            loss = self.fwd(self.x, self.y)
        loss.backward()
        for opt in self.opt_plain:
            opt.step()
        self.zero_grad()

    def mc_step(self):
        """One MC step; returns its PhaseTimer seconds per phase (tree ... losses, backward, optimizer)."""
        timer = self.controller.timer
        with self.amp():
            out = self.controller.process_batch(self.xm, self.ym, self.mc_step_index, forward_fn=self.fwd)
        self.mc_step_index += 1
        with timer.phase("backward"):
            out.loss.backward()
        with timer.phase("optimizer"):
            for opt in self.opt_mc:
                opt.step()
            self.zero_grad()
        return timer.pop()

    # ---- the nets alone, on the inputs they see inside the MC step -------------------------------

    def prepare_components(self):
        cfg, c, K = self.cfg, self.controller, self.cfg.block_size
        captured = {}

        def capture(**kw):
            captured.update(kw)
            return self.fwd(**kw)

        with self.amp():
            out = c.process_batch(self.xm, self.ym, 0, forward_fn=capture)
        out.loss.backward()
        c.timer.pop()
        params = [p for module in (self.model, *self.nets) for p in module.parameters()]
        self.grads = [(p, p.grad.detach().clone() if p.grad is not None else None) for p in params]
        self.zero_grad()
        self.gpt_inputs = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in captured.items()}
        lod0 = captured["targets"] >= 0
        weight = torch.ones(self.B_mc, 1 + cfg.num_variants, device=self.device)
        weight[:, 0] = cfg.baseline_loss_weight
        self.lm_weight = weight.view(-1, 1) * lod0  # [V, W]
        with torch.no_grad():
            self.lod0 = self.model.transformer.wte(self.xm)  # [B_mc, T, D]
            levels = build_tree(self.lod0, c.gistnet, cfg)
        n = self.xm.size(1) // K
        base_map = most_compressed_map(n, cfg, device=self.device).expand(self.B_mc, n)
        self.base_wc = materialize(base_map, levels, self.xm, cfg, self.ym[:, -1])
        n_guided = cfg.num_variants // 2
        self.guided_wc = materialize(base_map.repeat_interleave(n_guided, 0), levels, self.xm, cfg, self.ym[:, -1],
                                     torch.arange(self.B_mc, device=self.device).repeat_interleave(n_guided))
        self.stub = MCController(self.model, StubGistNet(), StubLensNet(), replace(cfg, lens_match=False))  # the match is LensNet's work

    def gpt_alone(self):
        """The batched GPT forward + backward over [V, W] inputs_embeds (grad into the embeddings, as in MC)."""
        kw = dict(self.gpt_inputs, inputs_embeds=self.gpt_inputs["inputs_embeds"].clone().requires_grad_())
        with self.amp():
            per_pos = self.fwd(**kw)
        ((per_pos * self.lm_weight).sum() / self.lm_weight.sum()).backward()
        self.zero_grad()

    def gistnet_alone(self):
        """The tree's GistNet calls (every level) forward + backward, grad into LOD0 as in MC."""
        lod0 = self.lod0.clone().requires_grad_()
        with self.amp():
            levels = build_tree(lod0, self.controller.gistnet, self.cfg)
        sum(level.float().mean() for level in levels[1:] if level.numel()).backward()
        self.zero_grad()

    def lensnet_alone(self):
        """LensNet with grad on the base WCs (+ backward) and the no-grad re-scorings of the guided allocator."""
        c = self.controller
        with self.amp():
            match = c.question_match(self.lod0)  # None without --mc_lens_match
            scores = c.score(self.base_wc, match=match)
            scores.float().mean().backward()
            with torch.no_grad():
                for _ in range(self.cfg.allocator_iterations - 1):
                    c.score(self.guided_wc, grad=False, match=None if match is None else match.detach())
        self.zero_grad()

    @torch.no_grad()
    def controller_code_alone(self):
        """process_batch itself with stand-in nets (block mean, a cheap scorer, a zero 'GPT'): the controller's
        own work (maps, allocator, gathers, rope, loss bookkeeping), forward only. A lower bound of (b)."""
        with self.amp():
            self.stub.process_batch(self.xm, self.ym, self.mc_step_index,
                                    forward_fn=lambda inputs_embeds, targets, **_: inputs_embeds[..., 0].float() * 0)
        self.stub.timer.pop()

    def optimizer_alone(self):
        """AdamW + Muon over the GPT and the MC nets, with the gradients of a real MC step."""
        for p, grad in self.grads:
            p.grad = grad
        for opt in self.opt_mc:
            opt.step()
        self.zero_grad()


class StubGistNet(torch.nn.Module):
    """Stand-in GistNet for controller_code_alone: the block mean."""
    def forward(self, blocks, level=1, mask=None):
        return blocks.mean(1)


class StubLensNet(torch.nn.Module):
    """Stand-in LensNet for controller_code_alone: the first embedding channel as the score."""
    def forward(self, embeds, lod, rel_pos, valid, tail_len=None):
        return torch.where(valid, embeds[..., 0].float(), 0.0)


def timed(fn, device, clock: str = "wall"):
    """(seconds of one call of fn on `clock`, its return value)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    synchronize(device)
    t0 = now()
    out = fn()
    synchronize(device)
    return now() - t0, out


def rss_mb(field: str) -> float:
    """VmRSS (current) or VmHWM (peak) of this process from /proc/self/status, in MB.

    (Not getrusage's ru_maxrss: a child started by subprocess inherits its parent's peak there.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe_memory(args, device):
    """Child process: build, run warm-up + 2 steps of one mode, print its peak memory as JSON."""
    bench = Bench(args, device)
    step = bench.plain_step if args.probe == "plain" else bench.mc_step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = rss_mb("VmRSS")
        try:  # reset the peak to the current RSS, so it covers the steps only (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
    for _ in range(args.warmup + 2):
        step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mb("VmHWM")
    print(json.dumps({"mode": args.probe, "before_mb": before, "peak_mb": peak}))


def measure_memory(argv, mode):
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "scripts.bench_mc", *argv, f"--probe={mode}"]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"error: the {mode} memory probe failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def verdict(value, target, higher_is_better):
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "MISS"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    _, _, _, _, device = compute_init(args.device_type)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        return probe_memory(args, device)
    bench = Bench(args, device)
    bench.prepare_components()
    parts = {"gpt": bench.gpt_alone, "gistnet": bench.gistnet_alone, "lensnet": bench.lensnet_alone,
             "optimizer": bench.optimizer_alone, "controller_code": bench.controller_code_alone}
    for _ in range(args.warmup):
        bench.plain_step()
        bench.mc_step()
        for fn in parts.values():
            fn()
    times = {k: [] for k in ("plain", "mc", *parts)}
    phases = []
    for _ in range(args.steps):  # interleaved, so background load affects every measurement alike
        times["plain"].append(timed(bench.plain_step, device, args.clock)[0])
        dt, phase = timed(bench.mc_step, device, args.clock)
        times["mc"].append(dt)
        phases.append(phase)
        for name, fn in parts.items():
            times[name].append(timed(fn, device, args.clock)[0])
    summary = statistics.median if args.stat == "median" else min
    med = {k: summary(v) for k, v in times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}
    phase_med = {k: summary([p.get(k, 0.0) for p in phases]) for k in phases[0]}
    nets = med["gpt"] + med["gistnet"] + med["lensnet"] + med["optimizer"]
    overhead = med["mc"] - nets
    step_ratio = med["mc"] / med["plain"]
    overhead_share = overhead / med["mc"]
    tok_plain = args.batch_size * args.seq_len / med["plain"]
    tok_mc = bench.B_mc * args.seq_len / med["mc"]
    tokens_ratio = tok_mc / tok_plain
    memory = {} if args.no_memory else {mode: measure_memory(argv, mode) for mode in ("plain", "mc")}

    cfg, c = bench.cfg, bench.controller
    V = bench.B_mc * (1 + cfg.num_variants)
    ms = lambda s: f"{1000 * s:8.1f}"  # noqa: E731
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device) \
        if device.type == "cuda" else device.type
    print(f"device {device} ({threads}), autocast {autocast_dtype(device.type, args.cpu_bf16)}, compile {args.compile}")
    print(f"model: depth {args.depth}, width {bench.model.config.n_embd}, vocab {args.vocab_size}, "
          f"{bench.model.num_params():,} params")
    print(f"MC config: K={cfg.block_size} W={cfg.wc_budget} R={cfg.recent} H={cfg.horizon} N={cfg.num_variants} "
          f"max_lod={cfg.max_lod} allocator={cfg.allocator} x{cfg.allocator_iterations} positional={cfg.positional}")
    print(f"           {c.gistnet.summary()}; {c.lensnet.summary()}")
    print(f"plain step: B={args.batch_size} x T={args.seq_len} = {args.batch_size * args.seq_len:,} entries, "
          f"{args.batch_size * args.seq_len:,} data tokens")
    print(f"MC step:    B_mc={bench.B_mc} x (1+N)={1 + cfg.num_variants} = V={V} WCs x W={cfg.wc_budget} = "
          f"{V * cfg.wc_budget:,} entries, {bench.B_mc * args.seq_len:,} data tokens (history T={args.seq_len})")
    print(f"timings: {args.stat} of {args.steps} interleaved steps after {args.warmup} warm-up, {args.clock} clock "
          "(min..max in brackets)")
    print()
    print(f"{'':36s}{'plain':>12s}{'MC':>12s}{'ratio':>10s}{'target':>10s}")
    print(f"{'(a) step time (ms)':36s}{ms(med['plain']):>12s}{ms(med['mc']):>12s}{step_ratio:>9.2f}x"
          f"{'<= ' + str(TARGETS['step_ratio']) + 'x':>10s}  {verdict(step_ratio, TARGETS['step_ratio'], False)}")
    print(f"{'(b) orchestration overhead (ms)':36s}{'':>12s}{ms(overhead):>12s}{100 * overhead_share:>9.1f}%"
          f"{'<= ' + format(TARGETS['overhead_share'], '.0%'):>10s}  {verdict(overhead_share, TARGETS['overhead_share'], False)}")
    print(f"{'(c) data tokens/s':36s}{tok_plain:>12,.0f}{tok_mc:>12,.0f}{tokens_ratio:>9.2f}x"
          f"{'>= ' + str(TARGETS['tokens_ratio']) + 'x':>10s}  {verdict(tokens_ratio, TARGETS['tokens_ratio'], True)}")
    if memory:
        kind = "max allocated" if device.type == "cuda" else "peak RSS"
        p, m = memory["plain"], memory["mc"]
        print(f"{'(d) peak memory, ' + kind + ' (MB)':36s}{p['peak_mb']:>12,.0f}{m['peak_mb']:>12,.0f}"
              f"{m['peak_mb'] / p['peak_mb']:>9.2f}x")
        print(f"{'    growth over pre-step (MB)':36s}{p['peak_mb'] - p['before_mb']:>12,.0f}"
              f"{m['peak_mb'] - m['before_mb']:>12,.0f}"
              f"{(m['peak_mb'] - m['before_mb']) / max(p['peak_mb'] - p['before_mb'], 1e-9):>9.2f}x")
    print()
    print(f"MC step accounting (ms, {args.stat}s; alone = each net timed by itself on the MC step's inputs)")
    for name, label in [("gpt", f"GPT fwd+bwd on [V={V}, W={cfg.wc_budget}] inputs_embeds"),
                        ("gistnet", "GistNet fwd+bwd (tree levels)"),
                        ("lensnet", f"LensNet fwd+bwd (base) + {cfg.allocator_iterations - 1} no-grad re-score"),
                        ("optimizer", "optimizer step (GPT + GistNet + LensNet)")]:
        lo, hi = spread[name]
        print(f"  {label:58s}{ms(med[name])}  [{ms(lo).strip()}..{ms(hi).strip()}]  {100 * med[name] / med['mc']:5.1f}%")
    lo, hi = spread["mc"]
    print(f"  {'sum of the nets':58s}{ms(nets)}")
    print(f"  {'MC step':58s}{ms(med['mc'])}  [{ms(lo).strip()}..{ms(hi).strip()}]")
    print(f"  {'orchestration overhead = MC step - sum':58s}{ms(overhead)}            {100 * overhead_share:5.1f}%")
    lo, hi = spread["controller_code"]
    print(f"  {'  of which the controller code itself (stub nets, fwd)':58s}{ms(med['controller_code'])}  "
          f"[{ms(lo).strip()}..{ms(hi).strip()}]  {100 * med['controller_code'] / med['mc']:5.1f}%")
    lo, hi = spread["plain"]
    print(f"  {'plain step':58s}{ms(med['plain'])}  [{ms(lo).strip()}..{ms(hi).strip()}]")
    noisy = [k for k in ("plain", "mc") if spread[k][1] > 1.5 * spread[k][0]]
    if noisy:
        print(f"WARNING: noisy timings ({' and '.join(noisy)} steps vary by > 1.5x): the machine is busy; on a "
              "shared CPU rerun with --threads=1 --clock=cpu --stat=min")
    print(f"MC step by phase (PhaseTimer, wall ms, {args.stat}s): " + ", ".join(
        f"{k} {1000 * v:.1f} ({100 * v / med['mc']:.0f}%)" for k, v in phase_med.items()))
    return {"step_ratio": step_ratio, "overhead_share": overhead_share, "tokens_ratio": tokens_ratio,
            "medians": med, "phases": phase_med, "memory": memory}


if __name__ == "__main__":
    main()
