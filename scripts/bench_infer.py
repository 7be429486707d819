"""Benchmark: MegaContext inference (mc.session.MCSession) vs plain KV-cache decoding, measured in one run.

Reports, as ratios measured on the same machine in the same process (docs/architecture.md §12):
- decode tokens/s of an MC session with history h (4W, 16W, 64W) vs plain decoding at context W
  (target >= 0.95x, issue 12 item 4) and vs plain decoding over the full history h (MC should win,
  more so as h grows; target >= 5x at 64W);
- append throughput (tokens/s into the session, one token per call, budget fits and refocuses
  included) at history W, 4W and 64W (should be flat: O(1) amortised per token);
- the long-history row (`--long_history`, default 1,000,000 tokens; 0 skips it, for tests and CI):
  sessions that hold that history, with the LOD0 cache on and off (`MCConfig.cache_lod0`): history
  dropped (target: none), decode and append throughput vs their values at 4W (target >= 0.8x), tree
  memory and bytes per history token. Plain decoding over such a history is not run (its KV cache
  would not fit);
- the ceiling of the session's design: decode at 4W with GistNet and LensNet stubbed (bench_mc's stand-ins), so
  only the session's own work (tree, map, budget fits, the entries recomputed after a map change) is left;
- memory vs history: the MC decode state (KV cache over <= W entries + entry tables) is flat; the
  tree (the history itself: ids, token embeddings, gists) grows linearly by design and is shown
  apart; plain decoding's KV cache grows with the history. On CUDA the peak allocated memory during
  decoding is measured as well.
With one CPU thread (--threads=1) the verdicts use each arm's CPU time (time.thread_time, which all
intra-op work then runs on), so other processes on a shared machine do not decide them; wall-clock
rates are printed next to them. Otherwise (GPU, several threads) the verdicts use the wall clock.
Plain decoding "at context L" = a KV cache prefilled with L tokens, each timed step attends over
exactly L + 1 positions (the cache is truncated back to L after every step). Both arms sample
greedily and move each token to the host, as a chat would, inside one autocast region held over the
timed rounds, as chat_cli holds it (weights cast once; per-token regions cast them every forward:
on this CPU that made both arms ~1.5x slower).

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
from dataclasses import replace

import torch

from mc.build import build_controller, load_controller
from mc.config import MCConfig
from mc.runtime import MCController
from mc.session import MCSession
from nanochat.checkpoint import build_model, checkpoint_dir
from nanochat.common import CPU_BF16_CHOICES, autocast_ctx, autocast_dtype, compute_init, synchronize
from nanochat.configurator import FlagParser, checked_number
from nanochat.gpt import GPT, GPTConfig
from scripts.bench_mc import StubGistNet, StubLensNet


def build(args, device):
    """(controller, description) from a checkpoint (--tag) or a random model of the CPU preset size."""
    if args.tag:
        model, states, meta = build_model(checkpoint_dir(args.stage, args.tag), None, device)
        return load_controller(model, states, meta), f"checkpoint {args.stage}/{args.tag}"
    torch.manual_seed(args.seed)
    cfg = MCConfig(block_size=args.block_size, wc_budget=args.wc_budget, recent=args.recent,
                   horizon=min(32, args.recent), partial_gists=args.partial_gists, lens_match=args.lens_match)
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
    return tensor_mb(tree.ids, tree.lod0_cache, *tree.gists, tree.partial[1])


def median(xs):
    return sorted(xs)[len(xs) // 2]


class PlainArm:
    """Greedy decoding with the GPT's KV cache at a fixed context of L tokens (the cache is cut back to L each step)."""

    def __init__(self, model, ids, L: int, amp):
        self.model, self.L, self.amp = model, L, amp
        self.cache = model.new_kv_cache(1, L + 1)
        with torch.no_grad(), amp():
            for s in range(0, L, 1024):  # chunked prefill
                logits = model(ids[None, s:min(L, s + 1024)], kv_cache=self.cache, logits_to_keep=1)
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


def begin(controller, ids, L: int, args, amp) -> MCSession:
    """A session holding the first L tokens of ids, appended in chunks of at most 8,192 tokens (one refocus each)."""
    return MCSession.begin(controller, ids[:L], refocus_interval=args.refocus_interval, autocast=amp,
                           append_chunk=max(controller.cfg.wc_budget, min(L, 8192)))


class MCArm:
    """Greedy decoding of an MC session (one that holds an L-token history)."""

    def __init__(self, session: MCSession):
        self.session = session
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
        return tensor_mb(s.cache.k, s.cache.v, s._pos, s._lod, s._span, s._rope, s._map)


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
    """Appending tokens one per call (no decoding) to a session (one that holds an L-token history of ids)."""

    def __init__(self, session: MCSession, ids, L: int):
        self.session = session
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
    parser.add_argument("--histories", default="4,16,64", help="MC/full-history lengths, in multiples of W (4 is the "
                        "reference of the long-history row)")
    parser.add_argument("--long_history", type=checked_number(int, 0), default=1_000_000, help="tokens of the long-history "
                        "row: MC sessions with the LOD0 cache on and off (0 = skip it, e.g. in tests and CI)")
    parser.add_argument("--partial_gists", action=argparse.BooleanOptionalAction, default=MCConfig.partial_gists,
                        help="MCConfig.partial_gists of the random model (a checkpoint brings its own)")
    parser.add_argument("--lens_match", action=argparse.BooleanOptionalAction, default=MCConfig.lens_match,
                        help="MCConfig.lens_match of the random model: LensNet's question match in every refocus")
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
    mults = sorted({int(h) for h in args.histories.split(",")} | {4})  # 4W: the long-history row's reference
    L = args.long_history
    total = max((max(mults + [64]) + 1) * W, L) + 2 * (args.repeats + 1) * n
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (total,), generator=g).to(device)

    print(f"device {device} ({torch.get_num_threads()} threads), autocast {dtype}, model depth {model.config.n_layer} "
          f"width {model.config.n_embd} ({model.num_params():,} params, {source}); K={cfg.block_size} W={W} "
          f"R={cfg.recent} partial_gists={cfg.partial_gists} lens_match={cfg.lens_match} cache_lod0={cfg.cache_lod0}, refocus every "
          f"{args.refocus_interval} tokens; {n} tokens x {args.repeats} rounds per arm")
    arms = {"plain_W": PlainArm(model, ids, W, amp)}
    for m in mults:
        arms[f"mc_{m}W"] = MCArm(begin(controller, ids, m * W, args, amp))
        arms[f"full_{m}W"] = PlainArm(model, ids, m * W, amp)
    # the same session with GistNet and LensNet stubbed (bench_mc's stand-ins, no question match): what the session's
    # own work (tree, map, budget fits, recomputed entries) leaves of the ratio, whatever the nets would cost
    stub = MCController(model, StubGistNet(), StubLensNet(), replace(cfg, lens_match=False))
    arms["mc_stub_4W"] = MCArm(begin(stub, ids, 4 * W, args, amp))
    long_sessions, ingest = {}, {}
    if L:  # the long-history sessions: the LOD0 cache as configured, then the other way
        for cache in (cfg.cache_lod0, not cfg.cache_lod0):
            other = MCController(model, controller.gistnet, controller.lensnet, replace(cfg, cache_lod0=cache))
            t0 = time.perf_counter()
            long_sessions[cache] = begin(other, ids, L, args, amp)
            synchronize(device)
            ingest[cache] = L / (time.perf_counter() - t0)
            arms[f"mc_long_{cache}"] = MCArm(long_sessions[cache])
    with amp():  # one autocast region over the timed decoding, as chat_cli holds it (nanochat/engine.py)
        rates, cpu_rates, peaks = time_arms(arms, n, args.repeats, device)
    use_cpu_time = device.type == "cpu" and torch.get_num_threads() == 1
    judged = cpu_rates if use_cpu_time else rates  # the verdicts' measure (see the module docstring)
    base = judged["plain_W"]
    nan = float("nan")
    print(f"\ndecode (greedy, tokens/s, median of interleaved rounds; ratios and verdicts by "
          f"{'CPU time of this thread' if use_cpu_time else 'wall clock'})")
    print(f"  {'arm':<15}{'history':>10}{'tokens':>10}{'wall tok/s':>11}{'CPU tok/s':>10}  {'ratio (target)':<28}{'':<6}"
          f"{'state MB':>9}{'tree MB':>9}{'CUDA peak':>10}")

    def row(arm, label, length, name, ratio, ok, tree=nan):
        c = cpu_rates[name] if device.type == "cpu" else nan
        print(f"  {arm:<15}{label:>10}{length:>10}{rates[name]:>11.1f}{c:>10.1f}  {ratio:<28}{ok:<6}"
              f"{arms[name].memory_mb():>9.2f}{tree:>9.2f}{peaks.get(name, nan):>10.1f}")

    row("plain KV cache", "W", W, "plain_W", "1.00x plain@W", "")
    for m in mults:
        mc, full = judged[f"mc_{m}W"], judged[f"full_{m}W"]
        row("MC session", f"{m}W", m * W, f"mc_{m}W", f"{mc / base:.2f}x plain@W (>= 0.95)", verdict(mc >= 0.95 * base),
            tree_mb(arms[f"mc_{m}W"].session.tree))
        target = "(>= 5 at 64W)" if m == 64 else "(> 1 from 16W)" if m >= 16 else ""
        row("plain KV cache", f"{m}W full", m * W, f"full_{m}W", f"MC {mc / full:.2f}x this {target}",
            verdict(mc >= 5 * full) if m == 64 else verdict(mc > full) if m >= 16 else "")
    row("MC, stub nets", "4W", 4 * W, "mc_stub_4W", f"{judged['mc_stub_4W'] / base:.2f}x plain@W (ceiling)", "",
        tree_mb(arms["mc_stub_4W"].session.tree))
    for cache, session in long_sessions.items():
        name = f"mc_long_{cache}"
        mc = judged[name]
        row(f"MC LOD0 {'cache' if cache else 'no cache'}", f"{L / W:,.0f}W", session.num_tokens, name,
            f"{mc / base:.2f}x plain@W (>= 0.95)", verdict(mc >= 0.95 * base), tree_mb(session.tree))
    wall_ratios = [rates[f"mc_{m}W"] / rates["plain_W"] for m in mults]
    print(f"  wall-clock ratios MC / plain@W: {', '.join(f'{m}W {r:.2f}x' for m, r in zip(mults, wall_ratios))}")
    decoders = {f"{m}W": arms[f"mc_{m}W"] for m in mults}
    decoders["4W, stub nets"] = arms["mc_stub_4W"]
    decoders.update({f"{L:,} tokens (LOD0 cache {'on' if c else 'off'})": arms[f"mc_long_{c}"] for c in long_sessions})
    for label, arm in decoders.items():
        d, state = arm.decode_stats(), arm.session.state()
        print(f"  MC at {label} while decoding {d['decode_tokens']} tokens: {d['refocus']} refocuses, {d['budget_fits']} "
              f"budget fits, {d['prefills']} partial recomputes, {d['kv_computed'] / d['forwards']:.2f} entries "
              f"computed per token (KV reuse {d['kv_reused'] / (d['kv_reused'] + d['kv_computed']):.3f}); "
              f"WC now {state['wc_entries']}/{W} entries {state['lod_mix']}")
    results = dict(rates)
    gaps = [judged[f"mc_{m}W"] / judged[f"full_{m}W"] for m in mults]
    print(f"  MC / full-history ratio by history {', '.join(f'{m}W {r:.2f}x' for m, r in zip(mults, gaps))}: "
          f"gap grows with history: {verdict(all(b >= a * 0.95 for a, b in zip(gaps, gaps[1:])))}")
    ceilings = [base / judged[f"full_{m}W"] for m in mults]  # an MC token costs at least a plain@W one
    print(f"  the most any session reaches over the full history on this machine, plain@W / plain full: "
          f"{', '.join(f'{m}W {c:.2f}x' for m, c in zip(mults, ceilings))}")

    appenders = {f"{m}W": AppendArm(begin(controller, ids, m * W, args, amp), ids, m * W) for m in (1, 4, 64)}
    appenders.update({f"long_{c}": AppendArm(session, ids, L) for c, session in long_sessions.items()})
    with amp():
        wall, cpu, _ = time_arms(appenders, n, args.repeats, device)
    rate = cpu if use_cpu_time else wall
    lo, hi = rate["1W"], rate["64W"]
    print("\nappend (one token per call into the session: tree + map + budget fits + refocus, no decoding; "
          f"{'CPU time' if use_cpu_time else 'wall clock'})")
    print(f"  history W     {lo:>10.1f} tokens/s   (wall {wall['1W']:.1f})")
    print(f"  history 4W    {rate['4W']:>10.1f} tokens/s   (wall {wall['4W']:.1f})")
    print(f"  history 64W   {hi:>10.1f} tokens/s   (wall {wall['64W']:.1f})   ratio to W {hi / lo:.2f}  "
          f"(flat = >= 0.8) {verdict(hi >= 0.8 * lo)}")
    t0 = time.perf_counter()
    MCSession.begin(controller, ids[:64 * W], refocus_interval=args.refocus_interval, autocast=amp)
    synchronize(device)
    print(f"  prompt ingest of 64W = {64 * W} tokens in chunks of W: {64 * W / (time.perf_counter() - t0):,.0f} tokens/s")

    if long_sessions:
        ref_decode, ref_append = judged["mc_4W"], rate["4W"]
        print(f"\nsessions over {L:,} tokens (issue 12 item 3: no history dropped; decode and append >= 0.8x their "
              f"rate at 4W; by {'CPU time' if use_cpu_time else 'wall clock'})")
        print(f"  {'LOD0 cache':<11}{'uncovered':>10}{'depth':>6}{'partial':>8}  {'decode vs 4W (>= 0.8)':<28}"
              f"{'append vs 4W (>= 0.8)':<28}{'tree MB':>9}{'bytes/token':>12}{'ingest tok/s':>13}")
        for cache, session in long_sessions.items():
            tree, state = session.tree, session.state()
            uncovered = state["spans"]["uncovered"]
            dec, app = judged[f"mc_long_{cache}"] / ref_decode, rate[f"long_{cache}"] / ref_append
            per_token = tree_mb(tree) * 2**20 / tree.num_tokens
            depth = max([len(tree.gists)] + [level for level, _, _ in tree.partial[0]])
            print(f"  {'on' if cache else 'off':<11}{uncovered:>10,}{depth:>6}"
                  f"{len(tree.partial[0]):>8}  {f'{dec:.2f}x':<8}{verdict(dec >= 0.8):<20}{f'{app:.2f}x':<8}"
                  f"{verdict(app >= 0.8):<20}{tree_mb(tree):>9.1f}{per_token:>12.1f}{ingest[cache]:>13,.0f}")
            print(f"  {'':<11}no history dropped: {verdict(uncovered == 0)}; WC {state['wc_entries']}/{W} entries "
                  f"{state['lod_mix']}")
            results.update({f"long_decode_{cache}": dec, f"long_append_{cache}": app, f"long_uncovered_{cache}": uncovered,
                            f"long_bytes_per_token_{cache}": per_token})

    mc_mb = [arms[f"mc_{m}W"].memory_mb() for m in mults]
    tree = [tree_mb(arms[f"mc_{m}W"].session.tree) for m in mults]
    full_mb = [arms[f"full_{m}W"].memory_mb() for m in mults]
    flat = max(mc_mb) <= 1.05 * min(mc_mb)
    listing = lambda values: ", ".join(f"{m}W {mb:.2f} MB" for m, mb in zip(mults, values))  # noqa: E731
    print(f"\nmemory vs history: MC decode state (KV cache over <= W entries + entry tables) {listing(mc_mb)}: "
          f"flat {verdict(flat)}")
    print(f"  tree (the history itself, grows by design) {listing(tree)}")
    print(f"  plain KV cache over the full history {listing(full_mb)}")
    results.update(append_W=lo, append_4W=rate["4W"], append_64W=hi)
    return results


if __name__ == "__main__":
    main()
