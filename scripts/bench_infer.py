"""Benchmark: MegaContext inference (mc.session.MCSession) vs plain KV-cache decoding, measured in one run.

Reports, as ratios measured on the same machine in the same process (docs/architecture.md §12):
- decode tokens/s of an MC session with history h (4W, 16W, 64W) vs plain decoding at context W
  (target >= 0.8x) and vs plain decoding over the full history h (MC should win, more so as h grows);
- append throughput (tokens/s into the session, one token per call, budget fits and refocuses
  included) at history W and 64W (should be flat: O(1) amortised per token);
- memory vs history: the MC decode state (KV cache over <= W entries + entry tables) is flat; the
  tree (the history itself: ids, token embeddings, gists) grows linearly by design and is shown
  apart; plain decoding's KV cache grows with the history. On CUDA the peak allocated memory during
  decoding is measured as well.
With one CPU thread (--threads=1) the verdicts use each arm's CPU time (time.thread_time, which all
intra-op work then runs on), so other processes on a shared machine do not decide them; wall-clock
rates are printed next to them. Otherwise (GPU, several threads) the verdicts use the wall clock.
Plain decoding "at context L" = a KV cache prefilled with L tokens, each timed step attends over
exactly L + 1 positions (the cache is truncated back to L after every step). Both arms sample
greedily and move each token to the host, as a chat would.

The default model is the CPU preset size (depth 4, width 256) with the MC settings of bench_mc
(K=32, W=128, R=32) and random weights; zero-initialised GistNet/LensNet outputs get small random
values so that refocus really edits the working context (an untrained LensNet scores everything 0
and never edits). Every MC round of `--decode_tokens` (a multiple of the refocus interval) then
holds the same work: one refocus, one gist and one partial recompute.

    python -m scripts.bench_infer                     # CPU preset, random init
    python -m scripts.bench_infer --threads=1         # on a busy CPU (small-matrix ops hate contention)
    python -m scripts.bench_infer --tag=d4            # a base checkpoint trained with --mc
"""

import argparse
import time

import torch

from mc.build import build_controller, load_controller
from mc.config import MCConfig
from mc.session import MCSession
from nanochat.checkpoint import build_model, checkpoint_dir
from nanochat.common import CPU_BF16_CHOICES, autocast_ctx, autocast_dtype, compute_init, synchronize
from nanochat.configurator import FlagParser, checked_number
from nanochat.gpt import GPT, GPTConfig


def build(args, device):
    """(controller, description) from a checkpoint (--tag) or a random model of the CPU preset size."""
    if args.tag:
        model, states, meta = build_model(checkpoint_dir(args.stage, args.tag), None, device)
        return load_controller(model, states, meta), f"checkpoint {args.stage}/{args.tag}"
    torch.manual_seed(args.seed)
    cfg = MCConfig(block_size=args.block_size, wc_budget=args.wc_budget, recent=args.recent,
                   horizon=min(32, args.recent))
    config = GPTConfig.from_depth(args.depth, sequence_len=max(512, 4 * args.wc_budget), vocab_size=args.vocab_size)
    model = GPT(config).to(device)
    model.init_weights()
    controller = build_controller(model, cfg)
    with torch.no_grad():
        for net in (controller.gistnet, controller.lensnet):
            for p in net.parameters():
                if p.abs().sum() == 0:
                    p.normal_(std=0.02)
    return controller, "random init"


def tensor_mb(*tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) / 2**20


def tree_mb(tree) -> float:
    return tensor_mb(tree.ids, tree.lod0_cache, *tree.gists)


def median(xs):
    return sorted(xs)[len(xs) // 2]


class PlainArm:
    """Greedy decoding with the GPT's KV cache at a fixed context of L tokens (the cache is cut back to L each step)."""

    def __init__(self, model, ids, L: int, amp):
        self.model, self.L, self.amp = model, L, amp
        self.cache = model.new_kv_cache(1, L + 1)
        with torch.no_grad(), amp():
            for s in range(0, L, 1024):  # chunked prefill
                logits = model(ids[None, s:min(L, s + 1024)], kv_cache=self.cache)
        self.token = logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def run(self, n: int):
        for _ in range(n):
            self.cache.truncate(self.L)
            with self.amp():
                logits = self.model(self.token, kv_cache=self.cache)
            self.token = logits[:, -1:].argmax(-1)
            int(self.token)

    def memory_mb(self):
        return tensor_mb(self.cache.k, self.cache.v)


class MCArm:
    """Greedy decoding of an MC session that starts from an L-token history."""

    def __init__(self, controller, ids, L: int, args, amp):
        self.session = MCSession.begin(controller, ids[:L], refocus_interval=args.refocus_interval, autocast=amp)
        self.session.logits()  # the one prefill of <= W entries
        self.start = dict(self.session.stats)  # counters before decoding

    def decode_stats(self) -> dict:
        """Counters of the decoding rounds only (prompt ingest excluded)."""
        return {k: v - self.start[k] for k, v in self.session.stats.items()}

    def run(self, n: int):
        for _ in self.session.generate(n, temperature=0.0):
            pass

    def memory_mb(self):
        s = self.session  # the decode state: KV cache over <= W entries + entry tables + map
        return tensor_mb(s.cache.k, s.cache.v, s._pos, s._lod, s._rope, s._map)


def time_arms(arms: dict, n: int, repeats: int, device) -> tuple[dict, dict, dict]:
    """Median tokens/s of each arm by wall clock and (CPU only) by this thread's CPU time; rounds are
    interleaved across arms so that load drift hits all alike, and the first round only warms up.
    On CUDA, also the peak memory allocated while decoding."""
    wall = {name: [] for name in arms}
    cpu = {name: [] for name in arms}
    peaks = {}
    for r in range(repeats + 1):
        for name, arm in arms.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            t0, c0 = time.perf_counter(), time.thread_time()
            arm.run(n)
            synchronize(device)
            if r:
                wall[name].append(n / (time.perf_counter() - t0))
                cpu[name].append(n / max(time.thread_time() - c0, 1e-9))
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20
    return {k: median(v) for k, v in wall.items()}, {k: median(v) for k, v in cpu.items()}, peaks


class AppendArm:
    """Appending tokens one per call (no decoding) to a session that starts from an L-token history."""

    def __init__(self, controller, ids, L: int, args, amp):
        self.session = MCSession.begin(controller, ids[:L], refocus_interval=args.refocus_interval, autocast=amp)
        self.stream = iter(ids[L:].tolist())

    def run(self, n: int):
        for _ in range(n):
            self.session.append([next(self.stream)])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default="", help="checkpoint tag to benchmark (empty = random init)")
    parser.add_argument("--stage", default="base", help="checkpoint stage of --tag (base|mid|sft)")
    parser.add_argument("--depth", type=checked_number(int, 1), default=4, help="model depth of the random model (width = 64 x depth)")
    parser.add_argument("--vocab_size", type=checked_number(int, 2), default=4096, help="vocabulary of the random model")
    parser.add_argument("--block_size", type=checked_number(int, 2), default=32, help="K of the random model's MCConfig")
    parser.add_argument("--wc_budget", type=checked_number(int, 4), default=128, help="W of the random model's MCConfig")
    parser.add_argument("--recent", type=checked_number(int, 1), default=32, help="R of the random model's MCConfig (as in bench_mc)")
    parser.add_argument("--histories", default="4,16,64", help="MC/full-history lengths, in multiples of W")
    parser.add_argument("--decode_tokens", type=checked_number(int, 1), default=32, help="tokens per timed decode round (a multiple of "
                        "the refocus interval keeps the work of every MC round alike)")
    parser.add_argument("--repeats", type=checked_number(int, 1), default=15, help="timed rounds (median reported), after one warm-up round")
    parser.add_argument("--refocus_interval", type=checked_number(int, 1), default=32, help="session refocus interval")
    parser.add_argument("--threads", type=checked_number(int, 0), default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--cpu_bf16", default="auto", choices=CPU_BF16_CHOICES, help="bf16 autocast on CPU (auto: where faster than fp32)")
    parser.add_argument("--device_type", default="", help="cuda|mps|cpu (empty = autodetect)")
    parser.add_argument("--seed", type=checked_number(int, 0), default=0)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    _, _, _, _, device = compute_init(args.device_type)
    dtype = autocast_dtype(device.type, args.cpu_bf16)
    amp = lambda: autocast_ctx(device.type, dtype)  # noqa: E731
    controller, source = build(args, device)
    model, cfg = controller.model, controller.cfg
    model.eval()
    W, n = cfg.wc_budget, args.decode_tokens
    mults = [int(h) for h in args.histories.split(",")]
    total = (max(mults + [64]) + 1) * W + (args.repeats + 1) * n
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (total,), generator=g).to(device)

    print(f"device {device} ({torch.get_num_threads()} threads), autocast {dtype}, model depth {model.config.n_layer} "
          f"width {model.config.n_embd} ({model.num_params():,} params, {source}); K={cfg.block_size} W={W} "
          f"R={cfg.recent} max_lod={cfg.max_lod}, refocus every {args.refocus_interval} tokens; "
          f"{n} tokens x {args.repeats} rounds per arm")
    arms = {"plain_W": PlainArm(model, ids, W, amp)}
    for m in mults:
        arms[f"mc_{m}W"] = MCArm(controller, ids, m * W, args, amp)
        arms[f"full_{m}W"] = PlainArm(model, ids, m * W, amp)
    rates, cpu_rates, peaks = time_arms(arms, n, args.repeats, device)
    use_cpu_time = device.type == "cpu" and torch.get_num_threads() == 1
    judged = cpu_rates if use_cpu_time else rates  # the verdicts' measure (see the module docstring)
    base = judged["plain_W"]
    nan = float("nan")
    print(f"\ndecode (greedy, tokens/s, median of interleaved rounds; ratios and verdicts by "
          f"{'CPU time of this thread' if use_cpu_time else 'wall clock'})")
    print(f"  {'arm':<15}{'history':>10}{'tokens':>8}{'wall tok/s':>11}{'CPU tok/s':>10}  {'ratio':<20}{'':<6}"
          f"{'state MB':>9}{'tree MB':>9}{'CUDA peak':>10}")

    def row(arm, label, L, name, ratio, ok, tree=nan):
        c = cpu_rates[name] if device.type == "cpu" else nan
        print(f"  {arm:<15}{label:>10}{L:>8}{rates[name]:>11.1f}{c:>10.1f}  {ratio:<20}{ok:<6}"
              f"{arms[name].memory_mb():>9.2f}{tree:>9.2f}{peaks.get(name, nan):>10.1f}")

    row("plain KV cache", "W", W, "plain_W", "1.00x plain@W", "")
    for m in mults:
        mc, full = judged[f"mc_{m}W"], judged[f"full_{m}W"]
        row("MC session", f"{m}W", m * W, f"mc_{m}W", f"{mc / base:.2f}x plain@W", verdict(mc >= 0.8 * base),
            tree_mb(arms[f"mc_{m}W"].session.tree))
        row("plain KV cache", f"{m}W full", m * W, f"full_{m}W", f"MC {mc / full:.2f}x this",
            verdict(mc > full) if m >= 16 else "")  # the contract is at 16W; shorter histories are context
    wall_ratios = [rates[f"mc_{m}W"] / rates["plain_W"] for m in mults]
    print(f"  wall-clock ratios MC / plain@W: {', '.join(f'{m}W {r:.2f}x' for m, r in zip(mults, wall_ratios))}")
    for m in mults:
        d, state = arms[f"mc_{m}W"].decode_stats(), arms[f"mc_{m}W"].session.state()
        print(f"  MC at {m}W while decoding {d['decode_tokens']} tokens: {d['refocus']} refocuses, {d['budget_fits']} "
              f"budget fits, {d['prefills']} partial recomputes, {d['kv_computed'] / d['forwards']:.2f} entries "
              f"computed per token (KV reuse {d['kv_reused'] / (d['kv_reused'] + d['kv_computed']):.3f}); "
              f"WC now {state['wc_entries']}/{W} entries {state['lod_mix']}")
    results = dict(rates)
    gaps = [judged[f"mc_{m}W"] / judged[f"full_{m}W"] for m in mults]
    print(f"  MC / full-history ratio by history {', '.join(f'{m}W {r:.2f}x' for m, r in zip(mults, gaps))}: "
          f"gap grows with history: {verdict(all(b >= a * 0.95 for a, b in zip(gaps, gaps[1:])))}")

    appenders = {"W": AppendArm(controller, ids, W, args, amp), "64W": AppendArm(controller, ids, 64 * W, args, amp)}
    wall, cpu, _ = time_arms(appenders, n, args.repeats, device)
    rate = cpu if use_cpu_time else wall
    lo, hi = rate["W"], rate["64W"]
    print("\nappend (one token per call into the session: tree + map + budget fits + refocus, no decoding; "
          f"{'CPU time' if use_cpu_time else 'wall clock'})")
    print(f"  history W     {lo:>10.1f} tokens/s   (wall {wall['W']:.1f})")
    print(f"  history 64W   {hi:>10.1f} tokens/s   (wall {wall['64W']:.1f})   ratio {hi / lo:.2f}  "
          f"(flat = >= 0.8) {verdict(hi >= 0.8 * lo)}")
    t0 = time.perf_counter()
    MCSession.begin(controller, ids[:64 * W], refocus_interval=args.refocus_interval, autocast=amp)
    synchronize(device)
    print(f"  prompt ingest of 64W = {64 * W} tokens in chunks of W: {64 * W / (time.perf_counter() - t0):,.0f} tokens/s")

    mc_mb = [arms[f"mc_{m}W"].memory_mb() for m in mults]
    tree = [tree_mb(arms[f"mc_{m}W"].session.tree) for m in mults]
    full_mb = [arms[f"full_{m}W"].memory_mb() for m in mults]
    flat = max(mc_mb) <= 1.05 * min(mc_mb)
    listing = lambda values: ", ".join(f"{m}W {mb:.2f} MB" for m, mb in zip(mults, values))  # noqa: E731
    print(f"\nmemory vs history: MC decode state (KV cache over <= W entries + entry tables) {listing(mc_mb)}: "
          f"flat {verdict(flat)}")
    print(f"  tree (the history itself, grows by design) {listing(tree)}")
    print(f"  plain KV cache over the full history {listing(full_mb)}")
    results.update(append_W=lo, append_64W=hi)
    return results


if __name__ == "__main__":
    main()
