"""MCController (docs/architecture.md §8): one MC training step, its gradients, determinism, the three arms.

A tiny GPT (depth 2, width 64, vocab 256, T=256) with K=8, W=64, R=16, H=8 and N=3 variants. The
GPT's output projections start at zero (every position would only see itself, so gists could not
matter); `make` perturbs them so variants really differ.
"""

import math
import re
from dataclasses import asdict

import pytest
import torch

import mc.runtime
from mc.build import build_controller, load_controller, load_matching_nets
from mc.config import MCConfig, MCConfigError
from mc.runtime import VALIDATION_ARMS
from mc.tree import build_tree
from mc.working_context import GIST, RAW, entry_counts, is_legal, materialize, most_compressed_map, truncation_map
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizers

B, T, VOCAB = 2, 256, 256
SMALL = dict(block_size=8, wc_budget=64, recent=16, horizon=8, num_variants=3, gist_layers=1,
             lens_layers=1, lens_width=32)


def tiny_gpt(seq_len=T, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=VOCAB, n_layer=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():  # a "trained" GPT: positions see each other, so gists change the NLL
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.1)
            block.mlp.c_proj.weight.normal_(std=0.1)
    return model


def make(seed=0, **overrides):
    """(controller, x [B, T], y [B, T]) for the tiny model; data: a fixed random token stream."""
    model = tiny_gpt(seed=seed)
    controller = build_controller(model, MCConfig(**{**SMALL, **overrides}))
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    return controller, tokens[:, :-1], tokens[:, 1:]


def params(module):
    return dict(module.named_parameters())


def nonzero_grads(loss, module):
    """Names of module parameters that receive a non-zero gradient from loss (graph kept)."""
    names, ps = zip(*params(module).items())
    grads = torch.autograd.grad(loss, ps, retain_graph=True, allow_unused=True)
    return {n for n, g in zip(names, grads) if g is not None and g.abs().sum() > 0}


def test_process_batch_shapes_and_finite_loss():
    controller, x, y = make()
    N, W = controller.cfg.num_variants, controller.cfg.wc_budget
    seen = {}

    def forward_fn(**kw):  # the one batched GPT forward over all V working contexts
        seen["embeds"], seen["cos"], seen["targets"] = kw["inputs_embeds"].shape, kw["rope"][0].shape, kw["targets"]
        return controller.model(**kw)

    out = controller.process_batch(x, y, step=0, forward_fn=forward_fn)
    V = B * (1 + N)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert seen["embeds"] == (V, W, 64) and seen["cos"] == (V, W, 1, 32)
    assert out.metrics["wc_batch"] == V and out.metrics["variants_per_sample"] == 1 + N
    assert all(isinstance(v, (int, float)) and v == v for v in out.metrics.values())
    assert out.metrics["wc_entries"] <= W
    assert set(controller.timer.pop()) >= {"tree", "lensnet", "allocator", "wc_build", "forward", "losses"}
    # the last H targets are the same tokens (y[:, -H:]) for every variant of a sequence (sequence-major)
    H = controller.cfg.horizon
    for v, row in enumerate(seen["targets"]):
        assert torch.equal(row[row >= 0][-H:], y[v // (1 + N), -H:])


def test_training_with_partial_gists(monkeypatch):
    """T=256, K=8, R=16: 30 older blocks = 3·8 + 6. LensNet's base cover shows them without partial nodes (3 LOD2
    nodes, 6 LOD1 gists: 9 units to rank; the partial cover, a LOD3 and a LOD2 partial gist, would leave its
    softmax no LOD1 unit), the random variants start from the partial cover, so the GPT sees partial gists;
    every WC of the step is valid, LensNet's loss is not 0 and the LM loss trains GistNet through the partial
    gists (their masked calls)."""
    from mc.working_context import validate_wc
    controller, x, y = make(partial_gists=True)
    built, original = [], mc.runtime.materialize

    def checked(maps, levels, tokens, cfg, next_token=None, sample=None):
        wc = original(maps, levels, tokens, cfg, next_token, sample)
        validate_wc(wc, tokens, cfg, next_token)
        built.append(wc)
        return wc

    monkeypatch.setattr(mc.runtime, "materialize", checked)
    out = controller.process_batch(x, y, step=0)
    assert torch.isfinite(out.loss)
    base, wc = built[0], built[-1]  # the base cover, then the batch of all variants
    assert base.n_entries.tolist() == [3 + 6 + 16] * B
    assert base.lod[0, :9].tolist() == [2] * 3 + [1] * 6 and base.span[0, :4].tolist() == [64, 64, 64, 8]
    partial = wc.valid & (wc.lod >= 2) & (wc.span < torch.pow(8, wc.lod))
    assert partial.any() and (wc.lod == 1).any()  # random variants show partial gists, and open them
    assert out.metrics["lens_loss"] > 0
    assert "head.2.weight" in nonzero_grads(out.loss, controller.gistnet)  # (the zero-initialised output first)


def test_lens_loss_trains_only_lensnet_and_lm_loss_reaches_tree(monkeypatch):
    controller, x, y = make()
    captured = {}
    original = mc.runtime.best_variant_lens_loss

    def capture(units, expanded, nll):
        loss, hit = original(units, expanded, nll)
        captured["lens"] = loss
        return loss, hit

    monkeypatch.setattr(mc.runtime, "best_variant_lens_loss", capture)
    out = controller.process_batch(x, y, step=0)
    lens = captured["lens"]
    assert lens.item() > 0 and out.metrics["lens_loss"] == pytest.approx(lens.item())
    assert out.metrics["dnll_abs"] > 0, "variants must differ in their last-H NLL"
    # the LensNet loss reaches LensNet (its zero-initialised score vector first), never the GPT or GistNet
    assert "score_w" in nonzero_grads(lens, controller.lensnet)
    assert not nonzero_grads(lens, controller.model) and not nonzero_grads(lens, controller.gistnet)
    # the LM loss reaches GistNet (through the gists in the WCs) and the token embedding, not LensNet
    lm = out.loss - controller.cfg.lens_loss_weight * lens
    assert lm.item() == pytest.approx(out.metrics["lm_loss"], rel=1e-5)
    assert nonzero_grads(lm, controller.gistnet)
    assert "transformer.wte.weight" in nonzero_grads(lm, controller.model)
    assert not nonzero_grads(lm, controller.lensnet)


def test_lens_gradient_reaches_the_body_of_lensnet_once_it_scores(monkeypatch):
    controller, x, y = make()
    with torch.no_grad():
        controller.lensnet.score_w.normal_(std=0.5)  # a LensNet that already scores
    captured = {}
    original = mc.runtime.best_variant_lens_loss
    monkeypatch.setattr(mc.runtime, "best_variant_lens_loss", lambda *a: captured.setdefault("out", original(*a)))
    controller.process_batch(x, y, step=3)
    reached = nonzero_grads(captured["out"][0], controller.lensnet)
    # (the blocks' zero-initialised output projections still block their inner matrices)
    assert {"in_proj.weight", "lod_emb.weight", "pos_fc.weight", "score_fc.weight", "score_w", "x_q.weight",
            "x_v.weight", "c_proj.weight", "blocks.0.c_proj.weight", "blocks.0.mlp_proj.weight"} <= reached


def test_lensnet_reads_only_the_columns_up_to_the_last_visible_entry():
    """score() trims the padding after the last visible entry before LensNet: the same scores (and zeros for the
    padding) as LensNet over all W columns, with and without a focus end that hides the newest entries."""
    controller, x, y = make(lens_match=False)
    with torch.no_grad():
        for p in controller.lensnet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cfg, n = controller.cfg, T // SMALL["block_size"]
    wc = materialize(most_compressed_map(n, cfg).expand(B, n), controller.tree(x), x, cfg, y[:, -1])
    assert wc.valid.any(0).sum() < wc.valid.size(1) / 2, "the base working context is mostly padding"
    for focus_end in (None, torch.tensor([T - 4, T - 12])):
        visible = mc.runtime.visible_entries(wc, focus_end)
        full = controller.lensnet(wc.embeds, wc.lod, mc.runtime.rel_pos(wc), visible, tail_len=cfg.recent)
        scores = controller.score(wc, grad=False, focus_end=focus_end)
        assert scores.shape == full.shape and scores.abs().sum() > 0
        torch.testing.assert_close(scores, full)


def test_best_variant_lens_loss_ranks_the_winners_units_first():
    """The units the lowest-NLL variant expanded are pushed up, every other unit down; sequences where the
    variants tie do not count; units the base WC lacks (NaN) are never targets."""
    scores = torch.zeros(2, 5, requires_grad=True)
    units = torch.cat([scores[:, :4], torch.full((2, 1), float("nan"))], 1)  # unit 4: not expandable
    expanded = torch.zeros(2, 3, 5, dtype=torch.bool)
    expanded[0, 0, 1] = expanded[0, 1, 2] = expanded[0, 2, 3] = True
    expanded[1, :, 0] = True
    expanded[1, 1, 4] = True
    nll = torch.tensor([[2.0, 1.0, 2.5], [1.5, 1.5, 1.5]])  # sequence 0: variant 1 (unit 2) wins; sequence 1: a tie
    loss, hit = mc.runtime.best_variant_lens_loss(units, expanded, nll)
    loss.backward()
    grad = scores.grad
    assert loss.item() == pytest.approx(math.log(4))  # uniform scores over 4 units, one target
    assert grad[0, 2] < 0 and (grad[0, [0, 1, 3]] > 0).all()  # descent raises the winner, lowers the rest
    assert (grad[1] == 0).all()
    assert hit.item() == 0.0  # LensNet's top unit (a tie: the first) is not the winner; the tied sequence is not counted
    with torch.no_grad():
        scores[0, 2] = 5.0
    loss2, hit2 = mc.runtime.best_variant_lens_loss(torch.cat([scores[:, :4], units[:, 4:]], 1), expanded, nll)
    assert loss2.item() < loss.item() and hit2.item() == 1.0


@pytest.mark.parametrize("gist_optimizer", ["muon", "adamw"])
def test_one_optimizer_step_changes_gistnet_and_lensnet(gist_optimizer):
    controller, x, y = make(gist_optimizer=gist_optimizer)
    nets = controller.modules()
    muon_nets, adam_nets = controller.optimizer_split()
    assert muon_nets == ([controller.lensnet] if gist_optimizer == "adamw" else [controller.gistnet, controller.lensnet])
    optimizers = build_optimizers(controller.model, muon_nets, adam_nets)
    in_adamw, in_muon = ({id(p) for g in opt.param_groups for p in g["params"]} for opt in optimizers)
    gist_matrix, lens_matrix = id(controller.gistnet.blocks[0].c_q.weight), id(controller.lensnet.blocks[0].c_q.weight)
    assert (gist_matrix in in_adamw, gist_matrix in in_muon) == ((True, False) if gist_optimizer == "adamw" else (False, True))
    assert lens_matrix in in_muon and lens_matrix not in in_adamw
    before = {name: {k: p.detach().clone() for k, p in params(net).items()} for name, net in nets.items()}
    for step in range(2):
        controller.process_batch(x, y, step=step).loss.backward()
        for opt in optimizers:
            opt.step()
        for module in (controller.model, *nets.values()):
            module.zero_grad(set_to_none=True)
    for name, net in nets.items():
        changed = [k for k, p in params(net).items() if not torch.equal(p, before[name][k])]
        assert changed, f"{name} did not change"
    # after the first steps LensNet scores are no longer all zero, so guided variants start to expand
    out = controller.process_batch(x, y, step=2)
    assert out.metrics["lens_score_std"] > 0 and torch.isfinite(out.loss)


def test_deterministic_for_seed_and_step():
    a, x, y = make()
    b, _, _ = make()
    out_a, out_b = a.process_batch(x, y, step=5), b.process_batch(x, y, step=5)
    assert torch.equal(out_a.loss, out_b.loss) and out_a.metrics == out_b.metrics
    again = a.process_batch(x, y, step=5)
    assert torch.equal(again.loss, out_a.loss)
    other_step = a.process_batch(x, y, step=6)
    assert other_step.metrics != out_a.metrics, "variant sampling depends on the step"
    seeded = build_controller(tiny_gpt(), MCConfig(**{**SMALL, "seed": 7})).process_batch(x, y, step=5)
    assert seeded.metrics != out_a.metrics, "and on --mc_seed"


def test_frozen_gpt_and_gistnet_score_the_last_h_targets_alone():
    """A focus phase (GPT and GistNet frozen) computes only the last H entries' logits: LensNet's loss, its
    gradient and the variants' last-H NLL are those of the whole forward; the logged LM loss is the last H's."""
    outs = []
    for frozen in (False, True):
        controller, x, y = make()
        for p in [*controller.model.parameters(), *controller.gistnet.parameters()]:
            p.requires_grad_(not frozen)
        seen = {}

        def forward_fn(**kw):
            seen["logits_to_keep"] = kw.get("logits_to_keep", 0)
            return controller.model(**kw)

        out = controller.process_batch(x, y, step=2, forward_fn=forward_fn)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in controller.lensnet.named_parameters() if p.grad is not None}
        outs.append((out.metrics, grads, seen["logits_to_keep"]))
    (whole, whole_grads, keep_whole), (tail, tail_grads, keep_tail) = outs
    assert keep_whole == 0 and 0 < keep_tail < SMALL["wc_budget"]
    for name in ("lens_loss", "nll_h_truncation", "nll_h_variants", "nll_h_best", "dnll_abs"):
        assert tail[name] == pytest.approx(whole[name], rel=1e-5), name
    N = SMALL["num_variants"]  # every variant's last H targets, the baseline's at weight 1
    assert tail["lm_loss"] == pytest.approx((tail["nll_h_truncation"] + N * tail["nll_h_variants"]) / (1 + N), rel=1e-5)
    assert whole_grads.keys() == tail_grads.keys() and whole_grads
    for name, g in whole_grads.items():
        torch.testing.assert_close(tail_grads[name], g, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("positional", ["gaussian", "index"])
def test_truncation_baseline_is_the_model_on_the_last_w_tokens(positional):
    controller, x, y = make(positional=positional)
    cfg, model = controller.cfg, controller.model
    W, H, n = cfg.wc_budget, cfg.horizon, T // cfg.block_size
    with torch.no_grad():
        levels = build_tree(model.transformer.wte(x), controller.gistnet, cfg)
        wc = materialize(truncation_map(n, cfg).expand(B, n), levels, x, cfg, y[:, -1])
        baseline = controller.forward_wc(wc, x)  # [B, W], what the training step's variant 0 computes
        plain = model(x[:, -W:], y[:, -W:], loss_reduction="none")
        arms = controller.evaluate_arms(x, y)
        out = controller.process_batch(x, y, step=0)
    torch.testing.assert_close(baseline, plain, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(arms["truncation"], plain[:, -H:], atol=1e-5, rtol=1e-5)
    assert out.metrics["nll_h_truncation"] == pytest.approx(plain[:, -H:].mean().item(), rel=1e-4)


def test_evaluate_arms():
    controller, x, y = make()
    H = controller.cfg.horizon
    arms = controller.evaluate_arms(x, y)
    assert set(arms) == set(VALIDATION_ARMS)
    assert all(arms[a].shape == (B, H) and torch.isfinite(arms[a]).all() for a in VALIDATION_ARMS)
    with torch.no_grad():
        full = controller.model(x, y, loss_reduction="none")[:, -H:]
    torch.testing.assert_close(arms["full"], full)
    assert not torch.equal(arms["mc"], arms["truncation"]), "the MC arm reads gists of the older history"
    # bits per byte over batches (every token 1 byte here): finite, one number per arm
    token_bytes = torch.ones(VOCAB, dtype=torch.long)
    bpb = controller.arms_bpb(iter([(x, y), (x, y)]), 2, token_bytes, torch.no_grad())
    assert set(bpb) == set(VALIDATION_ARMS) and all(v == v and v > 0 for v in bpb.values())
    assert bpb["full"] == pytest.approx(full.mean().item() / math.log(2), rel=1e-5)


def test_block_scores_read_every_old_block_as_a_lod1_gist():
    """LensNet's block scores: in one window they are its scores of the LOD1 view materialised as a WC;
    with a longer history every old block is scored once (several windows), the raw tail never."""
    controller, x, y = make()
    with torch.no_grad():
        controller.lensnet.score_w.normal_()
        levels = build_tree(controller.model.transformer.wte(x), controller.gistnet, controller.cfg)
        K, n = controller.cfg.block_size, T // 8
        scores = controller.block_scores(levels)  # T=256, K=8: 30 old blocks + 16 tail tokens, W=64: 1 window
        view = torch.where(torch.arange(n) < n - 2, GIST, RAW).to(torch.int8).expand(B, n)
        wc = materialize(view, levels, x, controller.cfg)
        direct = controller.score(wc, grad=False)[:, :n - 2]
        assert torch.allclose(scores[:, :n - 2], direct, atol=1e-5) and torch.isinf(scores[:, n - 2:]).all()
        long_x = torch.cat([x, x, x, x], dim=1)  # 1024 tokens: 126 old blocks in windows of 48
        long_levels = build_tree(controller.model.transformer.wte(long_x), controller.gistnet, controller.cfg)
        long_scores = controller.block_scores(long_levels)
        assert torch.isfinite(long_scores[:, :126]).all() and torch.isinf(long_scores[:, 126:]).all()
        maps = controller.focus(long_levels)
        assert (entry_counts(maps, K) <= controller.cfg.wc_budget).all() and (maps == RAW).sum() > 2 * B


def test_focus_policies():
    """One focus function for every reader of the tree: gists_only is the most compressed map, random maps are
    legal and seeded, mc expands blocks within W, an unknown policy is an error naming the known ones."""
    controller, x, _ = make()
    cfg, n = controller.cfg, T // controller.cfg.block_size
    with torch.no_grad():
        controller.lensnet.score_w.normal_()
        levels = controller.tree(x)
        assert torch.equal(controller.focus(levels, policy="gists_only"), most_compressed_map(n, cfg).expand(B, n))
        randoms = [controller.focus(levels, policy="random", generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
        assert torch.equal(randoms[0], randoms[1]) and not torch.equal(randoms[0], randoms[2])
        mc = controller.focus(levels)
        for maps in (*randoms, mc):
            assert is_legal(maps, cfg.block_size, cfg.recent // cfg.block_size, partial=cfg.partial_gists).all()
            assert (entry_counts(maps, cfg.block_size) <= cfg.wc_budget).all()
        assert (mc == RAW).sum() > (most_compressed_map(n, cfg) == RAW).sum() * B
    with pytest.raises(ValueError, match="unknown focus policy 'oracle'; known: mc, gists_only, random"):
        controller.focus(levels, policy="oracle")


BAD = [
    ("W < R", dict(wc_budget=32, recent=48, horizon=8), T, "--mc_wc_budget=32 is smaller than --mc_recent=48"),
    ("H > R", dict(horizon=32), T, "--mc_horizon=32"),
    ("K does not divide T", dict(), 260, "--mc_block_size=8 does not divide"),
    ("T <= W", dict(), 64, "--max_seq_len=64 must exceed --mc_wc_budget=64"),
    ("K not a power of two", dict(block_size=6, recent=18, wc_budget=60), 240, "--mc_block_size=6 must be a power of two"),
    ("unknown positional mode", dict(positional="spiral"), T, "--mc_positional"),
    ("GistNet MLP of no width", dict(gist_mlp_ratio=0), T, "--mc_gist_mlp_ratio=0 must be >= 1"),
    ("width-changing positional mode", dict(positional="2d"), T, "--mc_positional"),
    ("history does not fit W", dict(block_size=4, recent=8, wc_budget=12, horizon=4, partial_gists=False), T,
     "does not fit --mc_wc_budget=12 even fully compressed (16 entries with --mc_recent=8); raise the budget, drop "
     "--no-mc_partial_gists or"),
    ("history does not fit W with partial gists", dict(block_size=2, recent=4, wc_budget=5, horizon=4), T,
     "(10 entries with --mc_recent=4); raise the budget or shorten"),
    ("W = R", dict(wc_budget=16), T, "--mc_wc_budget=16 equals --mc_recent"),
    ("more teacher variants than variants", dict(teacher_variants=4), T, "--mc_teacher_variants=4 must lie in"),
]


@pytest.mark.parametrize("name, overrides, seq_len, message", BAD, ids=[b[0] for b in BAD])
def test_bad_configs_name_the_flag(name, overrides, seq_len, message):
    model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=VOCAB, n_layer=1, n_embd=64))
    with pytest.raises(MCConfigError, match=re.escape(message)):
        build_controller(model, MCConfig(**{**SMALL, **overrides}))


def test_teacher_variant_expands_the_block_whose_rare_tokens_recur_in_the_tail():
    """A key planted once in an old block and repeated in the raw tail: the teacher variant (the first of each
    sequence's N) expands exactly that block."""
    from mc.allocator import overlap_block_scores
    from mc.working_context import RAW
    controller, x, y = make(max_edits=1, allocator_iterations=2)
    K, n, R = 8, T // 8, 16
    x = x % 200  # ids >= 200 are "rare": they appear only where planted
    key = torch.tensor([201, 202, 203, 204])
    planted = torch.tensor([5, 11])  # the key's block in each sequence
    for b in range(B):
        x[b, planted[b] * K + 2:planted[b] * K + 6] = key
        x[b, T - 6:T - 2] = key  # the query, inside the raw tail
    scores = overlap_block_scores(x, K, R, VOCAB)
    assert torch.equal(scores[:, :n - R // K].argmax(1), planted)
    calls = []  # guided_maps is called for the teacher variants first, then for the LensNet-guided ones
    original = controller.guided_maps
    controller.guided_maps = lambda *args, **kwargs: calls.append(original(*args, **kwargs)) or calls[-1]
    controller.process_batch(x, y, step=0)
    teacher = calls[0]  # [B * teacher_variants, n]
    for b in range(B):
        expanded = ((teacher[b] == RAW) & (torch.arange(n) < n - R // K)).nonzero()[:, 0].tolist()
        assert expanded == [int(planted[b])], expanded


def test_history_lm_loss_is_the_plain_loss_over_w_windows():
    controller, x, y = make()
    W = controller.cfg.wc_budget
    start = x.size(1) % W
    windows = controller.model(x[:, start:].reshape(-1, W), y[:, start:].reshape(-1, W))
    loss, last = controller.history_lm_loss(x, y)
    assert torch.allclose(loss, windows, atol=1e-5)
    torch.testing.assert_close(last, controller.model(x[:, -W:], y[:, -W:], loss_reduction="none"), atol=1e-5, rtol=1e-5)
    weights = torch.ones_like(y, dtype=torch.float)
    weights[:, -W:] = 0  # only the older windows count
    older = controller.model(x[:, start:-W].reshape(-1, W), y[:, start:-W].reshape(-1, W))
    assert torch.allclose(controller.history_lm_loss(x, y, weights)[0], older, atol=1e-5)


@pytest.mark.parametrize("answer_weights", [False, True])
def test_history_lm_reads_the_truncation_baseline_from_its_last_window(answer_weights):
    """With the history LM on, the truncation baseline is not run again as a working context (it is the history's last
    window): the step's loss and every metric are those of the step without it plus the history LM."""
    controller, x, y = make()
    N = controller.cfg.num_variants
    weights = torch.rand(y.shape, generator=torch.Generator().manual_seed(0)) + 0.5 if answer_weights else None
    rows = []

    def forward_fn(*args, **kw):
        rows.append((args[0] if args else kw["inputs_embeds"]).size(0))
        return controller.model(*args, **kw)

    plain = controller.process_batch(x, y, step=0, weights=weights)
    mixed = controller.process_batch(x, y, step=0, weights=weights, history_lm_weight=0.5, forward_fn=forward_fn)
    assert rows == [B * T // controller.cfg.wc_budget, B * N]  # history windows, then the compressed variants alone
    assert "history_lm_loss" in mixed.metrics and "history_lm_loss" not in plain.metrics
    assert math.isclose(mixed.loss.item(), plain.loss.item() + 0.5 * mixed.metrics["history_lm_loss"], rel_tol=1e-5)
    for name, value in plain.metrics.items():
        assert mixed.metrics[name] == pytest.approx(value, rel=1e-5), name


def test_focus_ends_at_the_first_scored_answer():
    T, H = 64, 8
    answers = torch.zeros(3, T, dtype=torch.bool)
    answers[0, 60:62] = True  # one answer inside the horizon
    answers[1, 20:23] = True  # an earlier answer (another query or a packed example) is history ...
    answers[1, 58:60] = True  # ... the focus is decided before the scored one
    # row 2: no answer: up to the first of the last H targets
    assert mc.runtime.focus_ends(answers, H).tolist() == [61, 59, T - H + 1]


def test_bag_loss_teaches_gists_the_tokens_they_cover():
    controller, x, y = make(bag_loss_weight=1.0)
    gistnet = controller.gistnet
    assert gistnet.bag_head is not None and make()[0].gistnet.bag_head is None  # no head when off
    out = controller.process_batch(x, y, step=0)
    assert "bag_loss" in out.metrics
    levels = build_tree(controller.model.transformer.wte(x), gistnet, controller.cfg)
    bag = gistnet.bag_loss(levels, x)
    assert bag.item() == pytest.approx(out.metrics["bag_loss"], rel=1e-4)
    assert {"bag_head.weight", "head.2.weight"} <= nonzero_grads(bag, gistnet)  # head and the gist itself
    assert not nonzero_grads(bag, controller.lensnet)
    opt = torch.optim.Adam(gistnet.parameters(), lr=3e-3)
    for _ in range(30):  # a few steps on the bag loss alone: gists come to predict their own tokens
        opt.zero_grad()
        gistnet.bag_loss(build_tree(controller.model.transformer.wte(x).detach(), gistnet, controller.cfg), x).backward()
        opt.step()
    after = gistnet.bag_loss(build_tree(controller.model.transformer.wte(x), gistnet, controller.cfg), x)
    assert after.item() < bag.item() - 0.5


def test_checkpoints_from_before_the_bag_loss_load():
    controller, _, _ = make()
    meta = {"mc_config": {k: v for k, v in asdict(controller.cfg).items() if k != "bag_loss_weight"}}
    states = {"mc_gist": controller.gistnet.state_dict(), "mc_lens": controller.lensnet.state_dict()}
    loaded = load_controller(controller.model, states, meta)
    assert loaded.cfg.bag_loss_weight == 0.0 and loaded.gistnet.bag_head is None


def test_question_match_joins_lensnets_scores_and_its_loss(monkeypatch):
    """With --mc_lens_match every old block's score is LensNet's plus the block's question match, in the inference
    focus and in training (where the LensNet loss trains the match); a LensNet saved without it loads with the match
    fresh (its scale 0: the same scores as before) and GistNet as saved."""
    controller, x, y = make(lens_match=True)
    with torch.no_grad():
        controller.lensnet.score_w.normal_()
        controller.lensnet.match_scale.fill_(2.0)
        levels = controller.tree(x)
        n, older = T // 8, T // 8 - 2
        match = controller.question_match(levels[0])
        with_match = controller.block_scores(levels)
        order = torch.rand(B, n, generator=torch.Generator().manual_seed(1)).argsort(1)
        reordered = controller.block_scores(levels, block_order=order)  # the shuffled arm: matches move with gists
        controller.lensnet.match_scale.zero_()
        without = controller.block_scores(levels)
        controller.lensnet.match_scale.fill_(2.0)
    assert match.shape == (B, n) and match[:, :older].abs().sum() > 0
    torch.testing.assert_close(with_match[:, :older] - without[:, :older], match[:, :older], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reordered[:, :older] - without[:, :older], match.gather(1, order)[:, :older], atol=1e-4, rtol=1e-4)
    assert torch.isinf(with_match[:, older:]).all()
    captured = {}
    original = mc.runtime.best_variant_lens_loss
    monkeypatch.setattr(mc.runtime, "best_variant_lens_loss", lambda *a: captured.setdefault("out", original(*a)))
    controller.process_batch(x, y, step=3)
    assert {"match_proj.weight", "match_gate", "match_bias", "match_scale"} <= nonzero_grads(captured["out"][0], controller.lensnet)
    plain, _, _ = make(seed=1, lens_match=False)
    meta = {"mc_config": asdict(plain.cfg)}
    states = {"mc_gist": plain.gistnet.state_dict(), "mc_lens": plain.lensnet.state_dict()}
    message = load_matching_nets(controller, states, meta, "a checkpoint")
    assert "question match (--mc_lens_match) starts fresh" in message
    assert all(torch.equal(p, plain.gistnet.state_dict()[k]) for k, p in controller.gistnet.state_dict().items())
    assert torch.equal(controller.lensnet.score_w, plain.lensnet.score_w) and controller.lensnet.match_scale.item() == 2.0
