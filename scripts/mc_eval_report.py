"""Output of scripts/mc_eval.py: summaries, JSON, PNGs, report section.

`write_outputs(results, report_dir)` turns the raw needle records into accuracy tables (per length,
per length x depth bin, per offset bin), writes report_dir/mc_eval.json atomically (NaN -> null),
the plots mc_eval_*.png, and the markdown tables as the report section "mc-eval".

Run as a script, it rewrites the section and plots from a saved mc_eval.json (no model needed):

    python -m scripts.mc_eval_report [--json=report/mc_eval.json]
"""

import json
import math
from pathlib import Path

import numpy as np

from nanochat import report
from nanochat.common import atomic_write_text, get_report_dir
from nanochat.configurator import FlagParser
from nanochat.eval_plots import heatmap, markdown_table


def _mean(values):
    return float(np.mean(values)) if len(values) else float("nan")


def summarize_needle(rec: dict, lengths, depth_bins: int, offset_bins: int, K: int) -> dict:
    """Per arm: accuracy per length, per length x depth bin, per offset bin (offset * bins // K)."""
    offset_bins = min(offset_bins, K)
    out = {"depth_bins": [i / depth_bins for i in range(depth_bins + 1)],
           "offset_bins": [[i * K // offset_bins, (i + 1) * K // offset_bins - 1] for i in range(offset_bins)],
           "examples": {}, "accuracy": {}, "by_depth": {}, "by_offset": {}, "hit_rate": {}}
    for arm, r in rec.items():
        L, depth, offset, correct = (np.asarray(r[k]) for k in ("L", "depth", "offset", "correct"))
        if not len(L):
            continue
        expanded = np.asarray([np.nan if e is None else float(e) for e in r.get("expanded", [None] * len(L))])
        if np.isfinite(expanded).any():  # arms with maps: the needle's blocks shown raw, among needles outside the tail
            out["hit_rate"][arm] = {int(l): _mean(expanded[(L == l) & np.isfinite(expanded)]) for l in lengths
                                    if ((L == l) & np.isfinite(expanded)).any()}
        d_bin = np.minimum((depth * depth_bins).astype(int), depth_bins - 1)
        o_bin = offset * offset_bins // K
        out["accuracy"][arm] = {int(l): _mean(correct[L == l]) for l in lengths if (L == l).any()}
        out["by_depth"][arm] = {int(l): [_mean(correct[(L == l) & (d_bin == b)]) for b in range(depth_bins)]
                                for l in lengths if (L == l).any()}
        out["by_offset"][arm] = [_mean(correct[o_bin == b]) for b in range(offset_bins)]
        for l in lengths:  # examples per length: the most any arm scored (arms skip lengths they cannot run)
            out["examples"][int(l)] = max(out["examples"].get(int(l), 0), int((L == l).sum()))
    out["examples"] = {l: c for l, c in out["examples"].items() if c}
    return out


def _clean(obj):
    """JSON-safe copy: NaN/inf -> None, keys -> str."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    return obj


def _arm_table(per_arm: dict, columns, head: str, digits: int = 3) -> str:
    rows = [[arm] + [per_arm[arm].get(c) for c in columns] for arm in per_arm if per_arm[arm]]
    return markdown_table([head, *columns], rows, digits) if rows else "(no results)"


def _lines(path, per_arm: dict, xlabel: str, ylabel: str, title: str, logx: bool = False):
    series = {arm: (list(v), list(v.values())) for arm, v in per_arm.items() if v}
    if series:
        report.plot_curves(path, series, xlabel, ylabel, title, logx=logx)
        return [("img", path.name)]
    return []


def write_outputs(results: dict, report_dir) -> dict:
    cfg = results["eval_config"]
    W, K, E = results["W"], results["K"], results["tail"]
    items = [{"checkpoint": results["checkpoint"]["mc"], "step": results["checkpoint"]["step"], "W": W, "K": K,
              "R": results["mc_config"]["recent"], "scored tail E": E, "full_max_len": results["full_max_len"],
              "arms": ", ".join(results["arms"]), "filler": cfg["filler"]}]
    if "needle" in results:
        if "accuracy" not in results["needle"]:  # raw records; a saved mc_eval.json holds the summary already
            results["needle"] = summarize_needle(results["needle"], results.get("needle_lengths", results["lengths"]), cfg["depth_bins"],
                                                 cfg["offset_bins"], K)
        nd = results["needle"]
        cols = list(nd["examples"])
        items += [f"**Needle accuracy** (exact match of the value) by history length in tokens "
                  f"(examples per length: {nd['examples']}):", _arm_table(nd["accuracy"], cols, "arm")]
        longest = max(cols, key=int)
        for L in dict.fromkeys([8 * W, int(longest)]):  # the headlines of the run's summary table
            at = {f"needle accuracy at {L / W:g}W ({arm})": acc[L] for arm, acc in nd["accuracy"].items() if L in acc}
            if at:
                items += [f"Needle accuracy at {L / W:g}W = {L} tokens:", at]
        items += _lines(report_dir / "mc_eval_needle_length.png", nd["accuracy"], "history length (tokens)",
                        "needle accuracy", f"Needle accuracy vs history length (W={W})", logx=True)
        if nd["hit_rate"]:
            items += ["**Focus hit rate**: share of needles (outside the raw tail) whose blocks the arm shows raw "
                      "(for mc: LensNet expanded them; for oracle: they fit W):",
                      _arm_table(nd["hit_rate"], [c for c in cols if any(c in v for v in nd["hit_rate"].values())], "arm")]
        bins = [f"{a}-{b}" for a, b in nd["offset_bins"]]
        by_off = {arm: dict(zip(bins, v)) for arm, v in nd["by_offset"].items()}
        items += ["Needle accuracy by the needle's offset inside its block (all lengths):", _arm_table(by_off, bins, "arm")]
        items += _lines(report_dir / "mc_eval_needle_offset.png", {a: dict(enumerate(v)) for a, v in nd["by_offset"].items()},
                        f"offset bin (of {len(bins)} over K={K})", "needle accuracy", "Needle accuracy by offset in block")
        depth_labels = [f"{nd['depth_bins'][i]:.1f}-{nd['depth_bins'][i + 1]:.1f}" for i in range(cfg["depth_bins"])]
        for arm, table in nd["by_depth"].items():
            path = report_dir / f"mc_eval_needle_{arm}.png"
            heatmap(path, [table[l] for l in table], list(table), depth_labels, f"Needle accuracy: {arm} (W={W})",
                    "depth (0 = oldest)", "history length")
            items.append(("img", path.name))
    if "recall" in results:
        rc = results["recall"]
        cols = sorted({n for v in rc["accuracy"].values() for n in v})
        items += [f"**Associative recall** accuracy per query vs number of pairs (history {rc['length']} tokens):",
                  _arm_table(rc["accuracy"], cols, "arm")]
        at_length = {f"recall accuracy at {rc['length'] / W:g}W ({arm})": _mean([v for v in acc.values() if math.isfinite(v)])
                     for arm, acc in rc["accuracy"].items() if any(math.isfinite(v) for v in acc.values())}
        if at_length:  # the headline of the run's summary table
            items += [f"Recall accuracy at {rc['length']} tokens, mean over {', '.join(map(str, cols))} pairs:", at_length]
        items += _lines(report_dir / "mc_eval_recall.png", rc["accuracy"], "key -> value pairs", "accuracy",
                        f"Recall at history {rc['length']}")
    if "ruler" in results:
        ru = results["ruler"]
        items.append(f"**RULER tasks**: share of answers exactly right, per history length in tokens "
                     f"({ru['examples']} examples per task and length):")
        for task, per_arm in ru["accuracy"].items():
            cols = sorted({n for v in per_arm.values() for n in v})
            items += [f"{task}:", _arm_table(per_arm, cols, "arm")]
            items += _lines(report_dir / f"mc_eval_ruler_{task}.png", per_arm, "history length (tokens)", "accuracy",
                            f"RULER {task} (W={W})", logx=True)
    if "loss" in results:
        ls = results["loss"]
        for key, what in (("natural", "natural text (val split)"), ("facts", "facts documents, all tail tokens"),
                          ("facts_far", "facts documents, far-recall tokens only")):
            cols = sorted({n for v in ls[key].values() for n in v})
            if cols:
                items += [f"**Tail NLL** (nats, final {E} tokens) vs history length: {what}:", _arm_table(ls[key], cols, "arm")]
                items += _lines(report_dir / f"mc_eval_loss_{key}.png", ls[key], "history length (tokens)",
                                "NLL (nats)", f"Tail NLL vs history: {what}", logx=True)
        paired = ls.get("paired", {})
        cols = sorted({n for v in paired.values() for n in v})
        if cols:
            n = max(v["texts"] for per in paired.values() for v in per.values())
            items += [f"**Paired per text** (natural text, the same {n} texts under both arms): mean difference of the "
                      "tail NLL ± its standard error; below 0 = the first arm predicts better:",
                      markdown_table(["arms", *cols], [[pair, *(f"{per[c]['mean']:+.3f} ± {per[c]['se']:.3f}" if c in per
                                                               else None for c in cols)] for pair, per in paired.items()])]
        for key, what in (("natural", "natural text"), ("facts_far", "facts far-recall tokens")):
            table = ls["substitution"][key]
            if table:
                kinds = ["raw", "gists", "none", "delta", "recovered"]
                items += [f"**Substitutability** ({what}): tail NLL with older history raw / as gists (most compressed) / "
                          "absent; delta = gists - raw, recovered = (none - gists) / (none - raw). Beyond W, 'raw' "
                          "shows the GPT more entries than MC training ever does:",
                          markdown_table(["history", *kinds], [[L, *[table[L].get(k) for k in kinds]] for L in table])]
    if "tasks_file" in results:
        tf = results["tasks_file"]
        items += [f"**Tasks file** {tf['path']} ({tf['items']} items), exact match:",
                  markdown_table(["arm", "accuracy"], [[a, v] for a, v in tf["accuracy"].items()])]
    if results["skipped"]:
        items += ["Skipped:", "\n".join(f"- {s}" for s in results["skipped"])]
    atomic_write_text(report_dir / "mc_eval.json", json.dumps(_clean(results), indent=2))
    report.log_section("mc-eval", "MegaContext evaluation", items)
    return results


def _restore(obj):
    """A saved mc_eval.json as write_outputs made it: keys of digits -> int, null -> NaN (undoes _clean)."""
    if isinstance(obj, dict):
        return {int(k) if k.isdigit() else k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    return math.nan if obj is None else obj


REQUIRED = ["checkpoint", "mc_config", "eval_config", "W", "K", "tail", "full_max_len", "arms", "lengths", "skipped"]


def main(argv=None):
    parser = FlagParser(prog="python -m scripts.mc_eval_report", description="Rewrite the report section "
                        "'mc-eval' and the mc_eval_*.png plots from a saved mc_eval.json, e.g. after a change to how "
                        "they are drawn. The evaluation itself is `python -m scripts.mc_eval`.")
    parser.add_argument("--json", type=str, default="", help="the mc_eval.json to read (default: mc_eval.json in "
                        "the report dir, $MC_REPORT_DIR or ./report)")
    args = parser.parse_args(argv)
    report_dir = get_report_dir()
    path = Path(args.json) if args.json else report_dir / "mc_eval.json"
    try:
        results = json.loads(path.read_text())
    except OSError as e:
        raise SystemExit(f"error: cannot read {path} ({e.strerror or e}): run `python -m scripts.mc_eval` first")
    except ValueError as e:
        raise SystemExit(f"error: {path} is not JSON ({e})")
    missing = [k for k in REQUIRED if not isinstance(results, dict) or k not in results]
    if missing:
        raise SystemExit(f"error: {path} is not an mc_eval.json (no {', '.join(missing)})")
    write_outputs(_restore(results), report_dir)
    print(f"rewrote the mc-eval section and plots in {report_dir} from {path}")


if __name__ == "__main__":
    main()
