"""Evaluation arms at a fixed working-context budget W (docs/architecture.md §10), for scripts/mc_eval.py.

An arm reads a batch of histories x [B, L] (L a multiple of K; y [B, L] the next tokens) and
predicts the final E = `tail` targets y[:, L-E:], E <= R, so every arm shows those tokens raw and
all arms score exactly the same positions. `ArmEvaluator.run` returns per arm the NLL [B, E] and
the greedy prediction [B, E] of those positions (teacher-forced), plus, for the arms that read the
tree, the LOD maps [B, L // K] they used (which blocks were expanded), or a string saying why the
arm was skipped for this batch. Arms:

  truncation     the GPT on the last W tokens (standard rotary; RoPE is relative, so this equals a
                 working context of W raw tokens)
  full           the GPT on the whole history, when L <= full_max_len (rotary tables grow on demand,
                 but beyond a few times the trained length the model is out of distribution)
  mc             the full system, as sessions run it: LensNet scores every old block as a LOD1 gist and
                 the best blocks are shown raw, then the nodes above them opened, within W (MCController.focus)
  no_read_on     the mc arm with each block expanded on its own merit (MCConfig.read_on off: a block does not
                 bring the block after it), the ablation of read-on
  gists_only     the most compressed map (everything old as gists, nothing expanded)
  random         random legal maps that use the budget (working_context.random_maps)
  similarity     greedy expansion ranked by cosine(gist, mean of the raw tail) instead of LensNet
  oracle         the most compressed map with the blocks holding the answer shown raw as the mc arm shows
                 its picks (allocator.oracle_maps); `evidence` [B, n] counts the evidence tokens of each
                 block, blocks holding more evidence first, as many as fit W
  shuffled       the mc arm on a tree whose gists are permuted across the nodes of their level in each row
                 (positions and spans stay), before LensNet reads them, and with --mc_lens_match each block's
                 question match taken from the block whose gist it got: does MegaContext use what blocks
                 say, or only that something is there?
  mean_gist      the mc arm of a second checkpoint trained with --mc_gist_type=mean
  plain_truncation, plain_full   truncation / full of a plain (no --mc) checkpoint, when given
MC arms are skipped for histories that do not fit W even fully compressed (cfg.min_entries(L) > W).
The focus of the LensNet-driven arms (mc, no_read_on, shuffled, mean_gist, similarity) is decided from the history up
to `focus_end` (tokens per row; default L - E + 1, the input of the first scored target; mc_eval passes
the start of the answer): what a session would know when the question has been asked, never the
answer itself (see mc.runtime.focus_ends; training decides its focus the same way).
`run_maps` scores arbitrary LOD maps (substitutability: all raw vs gists vs nothing).
"""

import dataclasses

import torch
import torch.nn.functional as F

from mc.allocator import edit_maps, oracle_maps, similarity_scores
from mc.runtime import visible_entries
from mc.working_context import RAW, materialize

MC_ARMS = ("mc", "no_read_on", "gists_only", "random", "similarity", "oracle", "shuffled")  # read the MC checkpoint's tree
ARMS = ("truncation", "full", *MC_ARMS, "mean_gist", "plain_truncation", "plain_full")


def shuffle_gists(levels, generator=None):
    """The tree with the gists of every level permuted across its nodes, per row (tokens unchanged), and the
    permutation of LOD1 (block i now holds block order[b, i]'s gist): levels [lod0 [B, T, D], lod1 [B, n1, D], ...]
    -> (the same shapes, order [B, n1])."""
    out, perms = [levels[0]], []
    for level in levels[1:]:
        B, m, D = level.shape
        perms.append(torch.rand(B, m, generator=generator, device=level.device).argsort(1))  # [B, m]
        out.append(level.gather(1, perms[-1].unsqueeze(-1).expand(B, m, D)))
    return out, perms[0]


def _score(logits, targets):
    """logits [B, E, vocab], targets [B, E] -> (nll [B, E] fp32, greedy prediction [B, E])."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    return nll, logits.argmax(-1)


class ArmEvaluator:
    """The arms of one MC checkpoint (controller), optionally a plain model and a mean-gist controller."""

    def __init__(self, controller, plain_model=None, mean_controller=None, full_max_len: int = 0,
                 tail: int | None = None, seed: int = 0):
        cfg = controller.cfg
        self.controller, self.cfg, self.plain, self.mean = controller, cfg, plain_model, mean_controller
        self.tail = tail or cfg.recent
        if not 1 <= self.tail <= cfg.recent:
            raise ValueError(f"the scored tail ({self.tail} tokens) must lie in [1, R={cfg.recent}]: only the last R "
                             "tokens are raw in every arm")
        if mean_controller is not None:
            m = mean_controller.cfg
            if (m.block_size, m.wc_budget, m.recent) != (cfg.block_size, cfg.wc_budget, cfg.recent):
                raise ValueError(f"the mean-gist checkpoint has K={m.block_size}, W={m.wc_budget}, R={m.recent} but the MC "
                                 f"checkpoint K={cfg.block_size}, W={cfg.wc_budget}, R={cfg.recent}: arms must share them")
        self.full_max_len = full_max_len or 2 * controller.model.config.sequence_len
        self.seed = seed

    def arms(self) -> list:
        """The arms this evaluator can run (mean_gist / plain_* only with their checkpoints)."""
        return [a for a in ARMS if (a != "mean_gist" or self.mean) and (not a.startswith("plain") or self.plain)]

    def fits(self, L: int) -> bool:
        """A history of L tokens fits W fully compressed (MC arms can run)."""
        return L % self.cfg.block_size == 0 and self.cfg.min_entries(L) <= self.cfg.wc_budget

    # ---- pieces ----------------------------------------------------------------------------------

    def _gpt_tail(self, model, x):
        return model(x, logits_to_keep=self.tail)  # [B, E, vocab]

    def _wc_tail(self, controller, wc, x):
        """Logits [V, E, vocab] of the last E entries of materialised WCs of histories x (raw tail tokens)."""
        return controller.tail_logits(wc, x, self.tail)

    def _similarity_maps(self, levels, base, x, next_token, focus_end):
        cfg, maps = self.cfg, base
        for _ in range(cfg.allocator_iterations):
            wc = materialize(maps, levels, x, cfg, next_token)
            # cosine in [-1, 1], shifted positive so the whole budget is spent on the most similar gists
            scores = similarity_scores(wc, cfg.recent, visible_entries(wc, focus_end)) + 2.0 * (wc.valid & (wc.lod > 0))
            maps = edit_maps(maps, scores, wc, cfg, "greedy", allow_collapse=False)
        return maps

    # ---- running ---------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, x, y, arms, evidence=None, batch_index: int = 0, focus_end=None) -> dict:
        """{arm: (nll [B, E], pred [B, E][, maps [B, L // K]]) or a skip reason}. x, y [B, L] with L a multiple of K;
        evidence [B, L // K] bool: blocks holding the answer (needed by `oracle`); focus_end [B]: history
        tokens the focus may be decided from (default L - E + 1)."""
        cfg, ctl = self.cfg, self.controller
        B, L = x.shape
        W, E = cfg.wc_budget, self.tail
        if focus_end is None:
            focus_end = torch.full((B,), L - E + 1, device=x.device)
        target, nt = y[:, -E:], y[:, -1]
        out = {}
        gen = torch.Generator(device=x.device).manual_seed(self.seed * 1_000_003 + batch_index)
        levels = None  # the MC checkpoint's tree, built by the first arm that reads it
        for arm in arms:
            if arm in ("truncation", "plain_truncation"):
                model = ctl.model if arm == "truncation" else self.plain
                out[arm] = _score(self._gpt_tail(model, x[:, -W:]), target)
                continue
            if arm in ("full", "plain_full"):
                model = ctl.model if arm == "full" else self.plain
                out[arm] = (_score(self._gpt_tail(model, x), target) if L <= self.full_max_len
                            else f"history {L} > --full_max_len={self.full_max_len}")
                continue
            if arm not in (*MC_ARMS, "mean_gist"):
                raise ValueError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
            if not self.fits(L):
                out[arm] = f"history {L} does not fit W={W} even fully compressed"
                continue
            if arm == "mean_gist":
                m_levels = self.mean.tree(x)
                maps = self.mean.focus(m_levels, focus_end=focus_end)
                out[arm] = (*_score(self._wc_tail(self.mean, materialize(maps, m_levels, x, self.mean.cfg, nt), x), target), maps)
                continue
            if levels is None:
                levels = ctl.tree(x)
            arm_levels, order = shuffle_gists(levels, gen) if arm == "shuffled" else (levels, None)
            if arm in ("mc", "shuffled"):
                maps = ctl.focus(arm_levels, focus_end=focus_end, block_order=order)
            elif arm == "no_read_on":
                maps = ctl.select(ctl.block_scores(levels, focus_end), cfg=dataclasses.replace(cfg, read_on=False))
            elif arm in ("gists_only", "random"):
                maps = ctl.focus(levels, policy=arm, generator=gen)
            elif arm == "similarity":
                maps = self._similarity_maps(levels, ctl.focus(levels, policy="gists_only"), x, nt, focus_end)
            else:  # oracle
                if evidence is None:
                    out[arm] = "no answer blocks known for this task"
                    continue
                maps = oracle_maps(L // cfg.block_size, cfg, evidence.to(x.device))
            out[arm] = (*_score(self._wc_tail(ctl, materialize(maps, arm_levels, x, cfg, nt), x), target), maps)
        return out

    @torch.no_grad()
    def oracle_maps(self, x, evidence):
        """The oracle arm's LOD maps [B, L // K] for histories x [B, L] (for inspection and tests)."""
        return oracle_maps(x.size(1) // self.cfg.block_size, self.cfg, evidence.to(x.device))

    @torch.no_grad()
    def run_maps(self, x, y, named_maps: dict) -> dict:
        """{name: (nll [B, E], pred [B, E])} of the MC checkpoint under given maps {name: [B|1, n] int8};
        maps may exceed W (e.g. all raw): each is materialised with a budget of max(W, its entries)."""
        cfg = self.cfg
        levels, nt = self.controller.tree(x), y[:, -1]
        out = {}
        for name, maps in named_maps.items():
            maps = maps.expand(x.size(0), -1)
            raw = int((maps == RAW).sum(1).max()) * cfg.block_size
            wide = dataclasses.replace(cfg, wc_budget=max(cfg.wc_budget, raw + maps.size(1)))
            out[name] = _score(self._wc_tail(self.controller, materialize(maps, levels, x, wide, nt), x), y[:, -self.tail:])
        return out
