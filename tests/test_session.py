"""MCSession (docs/architecture.md §9): WC invariants under streaming, KV reuse == recompute, persistence, focus map.

A tiny GPT (depth 2, width 64) with K=4, W=32, R=8. Zero-initialised output projections of the GPT,
GistNet and LensNet get small random values, so logits depend on the whole WC, gists differ from
block means and LensNet's scores are non-zero. LensNet's last layer is `score_w . relu^2(...)`, so
|score_w| makes every score >= 0 and -|score_w| every score <= 0, which flips which blocks LensNet prefers.
"""

import dataclasses
import random

import pytest
import torch

from mc.build import build_controller
from mc.config import MCConfig
from mc.focus_map import plot_focus
from mc.positional import wc_rope
from mc.session import MCSession, entry_table
from mc.working_context import RAW, UNCOVERED, entry_token_ids, is_legal, materialize, node_sum, validate_wc
from nanochat.gpt import GPT, GPTConfig

VOCAB = 97
CFG = MCConfig(block_size=4, wc_budget=32, recent=8, horizon=4, gist_layers=1, lens_layers=1, lens_width=32,
               max_edits=4)


def make_controller(cfg=CFG, width=64, seed=0, **gpt):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=2, n_embd=width, **gpt))
    model.init_weights()
    controller = build_controller(model, cfg)
    with torch.no_grad():
        for net in (model, controller.gistnet, controller.lensnet):
            for p in net.parameters():
                if p.abs().sum() == 0:
                    p.normal_(std=0.05)
    model.eval()
    return controller


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def controller():
    return make_controller()


def tokens(n, seed=0):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def uneven_appends(session, stream, chunks):
    """Append stream to the session in chunks of the given sizes, cycled; yield (appends so far, tokens so far)."""
    t, i = 0, 0
    while t < stream.numel():
        n = chunks[i % len(chunks)]
        session.append(stream[t:t + n])
        t, i = t + n, i + 1
        yield i, t


def set_lens_sign(controller, sign):
    """Make LensNet score every entry >= 0 (sign +1), <= 0 (-1), or restore random signs (0)."""
    w = controller.lensnet.score_w
    if not hasattr(controller, "_score_w"):
        controller._score_w = w.detach().clone()
    with torch.no_grad():
        w.copy_(controller._score_w if sign == 0 else sign * controller._score_w.abs())


def check_session(s, cfg=CFG):
    """The session's WC is legal, within W, equal to a fresh materialisation, and its table matches the map."""
    assert 0 < s.n_entries <= cfg.wc_budget
    assert bool(is_legal(s.lod_map[None], cfg.block_size, cfg.recent // cfg.block_size, partial=cfg.partial_gists)[0])
    wc = s.working_context()
    validate_wc(wc, s.tree.token_ids, cfg)
    ref = materialize(s.lod_map[None], s.tree.levels(), s.tree.token_ids, cfg)
    for name in ("pos", "lod", "span", "valid", "targets"):
        assert torch.equal(getattr(wc, name), getattr(ref, name)), name
    torch.testing.assert_close(wc.embeds, ref.embeds, rtol=0, atol=0)
    pos, lod, span = entry_table(s.lod_map, s.num_tokens, cfg)
    assert torch.equal(s.entries()[0], pos) and torch.equal(s.entries()[1], lod)
    assert torch.equal(span, ref.span[0, :pos.numel()])


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


# ---- focus policy ----------------------------------------------------------------------------------

def test_invariants_over_thousands_of_appends_and_refocuses(controller):
    set_lens_sign(controller, 0)
    s = MCSession.begin(controller, tokens(50), refocus_interval=5)
    for i, t in uneven_appends(s, tokens(2000, seed=1), [1] * 30 + [3, 7, 40]):
        assert s.n_entries <= CFG.wc_budget and s.num_tokens == 50 + t
        if i % 50 == 0:
            check_session(s)
    assert i > 800  # appends
    check_session(s)
    st = s.state()
    assert st["refocus_count"] > 250 and st["map_changes"] > 50
    assert sum(st["spans"].values()) == s.num_tokens  # raw spans include the partial block
    assert sum(st["lod_mix"].values()) == st["wc_entries"]
    assert st["lod_mix"]["lod3"] > 0  # 2,000 tokens at K=4: the tree grew past LOD2


def test_the_smallest_budget_a_session_allows():
    """W = R + K - 1: with a full partial block no gist fits beside the raw tail; refocus still works."""
    cfg = MCConfig(block_size=4, wc_budget=11, recent=8, horizon=4, gist_layers=1, lens_layers=1, lens_width=32)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=VOCAB, n_layer=1, n_embd=64))
    model.init_weights()
    s = MCSession.begin(build_controller(model, cfg), tokens(20), refocus_interval=1)
    for tok in tokens(40, seed=5).tolist():
        s.append([tok])
        assert s.n_entries <= 11
    check_session(s, cfg)


def test_refocus_runs_every_interval(controller):
    set_lens_sign(controller, 0)
    s = MCSession.begin(controller, tokens(40), refocus_interval=7)
    before = s.stats["refocus"]
    for tok in tokens(70, seed=2).tolist():
        s.append([tok])
    assert s.stats["refocus"] - before >= 10


def test_100W_prompt_fits_the_budget(controller):
    set_lens_sign(controller, 0)
    prompt = tokens(100 * CFG.wc_budget, seed=3)
    s = MCSession.begin(controller, prompt)
    assert s.num_tokens == prompt.numel() and torch.equal(s.tree.token_ids[0], prompt)
    check_session(s)
    assert not (s.lod_map == UNCOVERED).any()  # 3200 tokens: the tree grows deep enough that nothing is dropped
    assert int(s.lod_map.max()) >= 4
    close(s.logits(), s.recompute_logits())


# ---- KV cache reuse ---------------------------------------------------------------------------------

@pytest.mark.parametrize("positional,gpt,match", [("gaussian", {}, False), ("index", {}, False),
                                                  ("gaussian", dict(value_embeds=True, layer_scalars=True, backout=True), False),
                                                  ("gaussian", {}, True)])
def test_kv_reuse_equals_recompute(positional, gpt, match):
    """Cached decode equals a fresh materialisation + full forward through refocuses, also with the GPT options
    (value embeddings read each entry's token; gists have none) and LensNet's question match."""
    cfg = dataclasses.replace(CFG, positional=positional, lens_match=match)
    ctl = make_controller(cfg, **gpt)
    s = MCSession.begin(ctl, tokens(60), refocus_interval=6)
    close(s.logits(), s.recompute_logits())
    for step, tok in enumerate(tokens(150, seed=4).tolist()):
        set_lens_sign(ctl, (1, -1, 0)[(step // 20) % 3])  # phases of different focus choices
        close(s.step(tok), s.recompute_logits())
    kv = s.state()["kv"]
    # the focus changed, and the entries before the first change were reused (a block shown raw anywhere in the
    # history moves every entry after it: with LensNet's preferences flipping, about as many reused as computed)
    assert kv["prefills"] > 5 and kv["reused"] > kv["computed"] / 2
    s.refocus(lookback=s.num_tokens)
    t = s.num_tokens % cfg.block_size  # evaluation's scores, and the session's reserve for its partial block
    assert torch.equal(s.lod_map, ctl.select(ctl.block_scores(s.tree.levels()), t, reserve=cfg.block_size - 1 - t)[0])


def test_session_frame_matches_evaluation_past_the_training_length(controller):
    """After a refocus, the session's rotary frame is the one a one-shot WC (training, mc_eval) lays out,
    so decoding past the GPT's training length (64 here) sees the same distances as evaluation."""
    set_lens_sign(controller, 0)
    s = MCSession.begin(controller, tokens(700, seed=9))
    s.refocus()
    assert s.num_tokens > 10 * s.max_len
    wc = materialize(s.lod_map[None], s.tree.levels(), s.tree.token_ids, CFG)
    rope = wc_rope(wc.pos, wc.span, wc.lod, wc.valid, controller.model.config.head_dim, CFG.positional, max_len=s.max_len)
    with torch.no_grad():
        ids = entry_token_ids(wc.pos, wc.lod, s.tree.token_ids, wc.valid, wc.sample)
        ref = controller.model(inputs_embeds=wc.embeds, token_ids=ids, rope=rope)[0, int(wc.n_entries[0]) - 1].float()
    close(s.logits(), ref)


def test_append_only_extends_the_cache(controller):
    set_lens_sign(controller, 0)
    s = MCSession.begin(controller, tokens(20), refocus_interval=1000)  # 20 raw entries, W = 32
    s.logits()
    for tok in tokens(8, seed=5).tolist():  # completes two blocks, stays within W: the WC only grows
        computed = s.stats["kv_computed"]
        close(s.step(tok), s.recompute_logits())
        assert s.stats["kv_computed"] == computed + 1
    assert s.stats["prefills"] == 1  # only the first prefill


def test_refocus_edits_reuse_the_prefix(controller):
    s = MCSession.begin(controller, tokens(200, seed=6), refocus_interval=1000)
    s.refocus()  # the rotary frame of the current history (it moves every 8 tokens here): only maps change below
    for sign in (-1, 1, -1, 1):  # LensNet's preferences flip, so each refocus picks other blocks
        set_lens_sign(controller, sign)
        before = s.lod_map.clone()
        s.logits()  # the cache holds the whole WC
        assert s.refocus() and not torch.equal(before, s.lod_map)
        old_pos, old_lod, _ = entry_table(before, s.num_tokens, s.cfg)
        new_pos, new_lod = s.entries()
        m = min(old_pos.numel(), new_pos.numel())
        differ = (old_pos[:m] != new_pos[:m]) | (old_lod[:m] != new_lod[:m])
        first_change = int(differ.long().argmax()) if differ.any() else m
        reused, computed = s.stats["kv_reused"], s.stats["kv_computed"]
        close(s.logits(), s.recompute_logits())
        assert s.stats["kv_reused"] - reused == first_change  # the cache before the first changed entry is kept
        assert s.stats["kv_computed"] - computed == s.n_entries - first_change
    set_lens_sign(controller, 0)


def test_budget_collapse_matches_recompute(controller):
    set_lens_sign(controller, 1)  # the focus fills W, so new tokens push the WC over it and force refocuses
    s = MCSession.begin(controller, tokens(120, seed=7), refocus_interval=3)
    fits = s.stats["budget_fits"]
    for tok in tokens(60, seed=8).tolist():
        close(s.step(tok), s.recompute_logits())
        assert s.n_entries <= CFG.wc_budget
    assert s.stats["budget_fits"] > fits
    set_lens_sign(controller, 0)


# ---- generation -------------------------------------------------------------------------------------

def test_generate_is_seeded_and_stops(controller):
    set_lens_sign(controller, 0)
    runs = [list(MCSession.begin(controller, tokens(30)).generate(40, temperature=1.0, seed=11)) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 40
    other = list(MCSession.begin(controller, tokens(30)).generate(40, temperature=1.0, seed=12))
    assert other != runs[0]
    s = MCSession.begin(controller, tokens(30))
    out = list(s.generate(40, temperature=1.0, seed=11, stop_tokens=[runs[0][5]]))
    first = runs[0].index(runs[0][5])
    assert out == runs[0][:first + 1]  # stops right after the stop token, which is yielded
    assert s.num_tokens == 30 + len(out) and s.tree.token_ids[0, -1] == out[-1]
    greedy = list(MCSession.begin(controller, tokens(30)).generate(5, temperature=0.0))
    assert greedy == list(MCSession.begin(controller, tokens(30)).generate(5, temperature=0.0, seed=99))
    with pytest.raises(ValueError, match="empty"):
        next(MCSession(controller).generate(3))
    with pytest.raises(ValueError, match="vocabulary"):
        MCSession(controller).append([VOCAB])


# ---- persistence ------------------------------------------------------------------------------------

def test_save_load_round_trip(controller, tmp_path):
    set_lens_sign(controller, 0)
    s = MCSession.begin(controller, tokens(300, seed=9), refocus_interval=5, tokenizer_id="tok-a")
    list(s.generate(30, seed=1))
    path = tmp_path / "session.pt"
    s.save(path)
    loaded = MCSession.load(path, controller, tokenizer_id="tok-a")
    a, b = s.state(), loaded.state()
    for key in ("history_tokens", "wc_entries", "lod_map", "entry_pos", "entry_lod", "lod_mix", "spans",
                "refocus_count", "budget_fits", "since_refocus", "refocus_interval", "edits"):
        assert a[key] == b[key], key
    assert torch.equal(s.tree.token_ids, loaded.tree.token_ids)
    for x, y in zip(s.tree.levels(), loaded.tree.levels()):
        assert torch.equal(x, y)
    close(loaded.logits(), s.logits())
    # both continue identically (greedy), and a second load samples exactly like the first
    assert list(s.generate(20, temperature=0.0)) == list(loaded.generate(20, temperature=0.0))
    close(loaded.logits(), s.logits())
    again = [list(MCSession.load(path, controller, tokenizer_id="tok-a").generate(15, seed=5)) for _ in range(2)]
    assert again[0] == again[1]
    assert not list(tmp_path.glob("*.tmp*"))  # the atomic write left no temp file
    # a session saved before MCConfig.read_on and recency_bonus existed (no digest then either) still loads
    state = torch.load(path, weights_only=True)
    del state["mc_config"]["read_on"], state["mc_config"]["recency_bonus"], state["sha256"]
    torch.save(state, tmp_path / "before_read_on.pt")
    old = MCSession.load(tmp_path / "before_read_on.pt", controller, tokenizer_id="tok-a")
    assert torch.equal(old.lod_map, MCSession.load(path, controller, tokenizer_id="tok-a").lod_map)


def test_load_refuses_bad_files(controller, tmp_path):
    set_lens_sign(controller, 0)
    s = MCSession.begin(controller, tokens(100), tokenizer_id="tok-a")
    good = tmp_path / "good.pt"
    s.save(good)
    data = good.read_bytes()

    def refused(path, pattern, ctl=controller, tokenizer_id="tok-a"):
        with pytest.raises(ValueError, match=pattern):
            MCSession.load(path, ctl, tokenizer_id=tokenizer_id)

    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage" * 100)
    refused(tmp_path / "corrupt.pt", "corrupt or truncated")
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) // 2])
    refused(tmp_path / "truncated.pt", "corrupt or truncated")
    torch.save({"gpt": controller.model.state_dict()}, tmp_path / "model.pt")
    refused(tmp_path / "model.pt", "not a MegaContext session file")
    refused(good, "tokenizer", tokenizer_id="tok-b")
    refused(good, "other MegaContext config: max_edits=4", ctl=make_controller(dataclasses.replace(CFG, max_edits=2)))
    refused(good, "another model .width 64", ctl=make_controller(width=128))
    refused(good, "other weights", ctl=make_controller(seed=1))
    (tmp_path / "text.pt").write_text("hello world\n")  # unpickling text raises KeyError
    refused(tmp_path / "text.pt", "corrupt or truncated")
    rng = random.Random(0)
    for trial in range(30):  # 16 random bytes anywhere: refused, or (zip padding) the content is unchanged
        flipped = bytearray(data)
        at = rng.randrange(len(data) - 16)
        flipped[at:at + 16] = bytes(rng.randrange(256) for _ in range(16))
        (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
        try:
            loaded = MCSession.load(tmp_path / "flipped.pt", controller, tokenizer_id="tok-a")
        except ValueError:
            continue
        assert torch.equal(loaded.tree.token_ids, s.tree.token_ids) and torch.equal(loaded.lod_map, s.lod_map)
    state = torch.load(good, weights_only=True)
    state["ids"][0, 5] += 1
    torch.save(state, tmp_path / "edited.pt")
    refused(tmp_path / "edited.pt", "changed since it was saved")
    state = torch.load(good, weights_only=True)
    del state["sha256"]  # as saved before digests: the checks below still apply
    state["version"] = 99
    torch.save(state, tmp_path / "v99.pt")
    refused(tmp_path / "v99.pt", "version 99")
    state["version"] = 1
    torch.save(state, tmp_path / "v1.pt")
    refused(tmp_path / "v1.pt", "format version 1 .trees capped at LOD2.*start a new session")
    state["version"] = 2
    state["lod_map"] = state["lod_map"][:-1]
    torch.save(state, tmp_path / "bad_map.pt")
    refused(tmp_path / "bad_map.pt", "inconsistent")
    with pytest.raises(FileNotFoundError):
        MCSession.load(tmp_path / "missing.pt", controller, tokenizer_id="tok-a")


# ---- focus map --------------------------------------------------------------------------------------

def test_focus_map_png(controller, tmp_path):
    set_lens_sign(controller, 0)
    s = MCSession.begin(controller, tokens(400, seed=10), refocus_interval=5)
    list(s.generate(20, seed=2))
    for target, name in ((s, "from_session.png"), (MCSession.begin(controller, tokens(3)).state(), "tiny.png")):
        path = plot_focus(target, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_engine_generates_a_batch_of_sessions(controller):
    """Engine.generate_sessions: greedy tokens of each row = that session decoding alone; stop tokens pad."""
    from nanochat.engine import Engine
    prompts = [tokens(150, seed=3), tokens(97, seed=4)]
    alone = []
    for prompt in prompts:
        session = MCSession.begin(controller, prompt)
        alone.append(list(session.generate(12, temperature=0.0)))
    sessions = [MCSession.begin(controller, prompt) for prompt in prompts]
    columns = list(Engine(controller.model).generate_sessions(sessions, max_tokens=12, temperature=0.0))
    assert [list(row) for row in zip(*columns)] == alone
    assert [s.num_tokens for s in sessions] == [150 + 12, 97 + 12]
    i = next(i for i in range(1, 11) if alone[0][i] not in alone[0][:i])  # a token row 0 first samples at step i
    stop = alone[0][i]  # row 0 stops after it and is padded; the other row goes on
    sessions = [MCSession.begin(controller, prompt) for prompt in prompts]
    columns = list(Engine(controller.model).generate_sessions(sessions, max_tokens=12, temperature=0.0, stop_tokens=[stop]))
    assert [c[0] for c in columns][:i + 1] == alone[0][:i + 1] and all(c[0] == stop for c in columns[i + 1:])
    assert sessions[0].num_tokens == 150 + i + 1


# ---- deep trees and partial gists ---------------------------------------------------------------------

def test_partial_gist_session_never_drops_history_and_matches_recompute(tmp_path):
    """K=4, W=32, R=8 with partial gists: thousands of tokens in uneven appends, LOD4+ nodes and partial nodes
    opened when the boundary moves; nothing is ever uncovered, the cached decode equals a full recompute, and a
    saved session loads and continues identically."""
    cfg = dataclasses.replace(CFG, partial_gists=True)
    ctl = make_controller(cfg)
    set_lens_sign(ctl, 0)
    s = MCSession.begin(ctl, tokens(50), refocus_interval=5)
    for i, _ in uneven_appends(s, tokens(3000, seed=11), [1] * 20 + [3, 7, 61]):
        assert s.n_entries <= cfg.wc_budget and not (s.lod_map == UNCOVERED).any()
        if i % 60 == 0:
            check_session(s, cfg)
            close(s.logits(), s.recompute_logits())
    check_session(s, cfg)
    assert int(s.lod_map.max()) >= 4 and s.tree.partial[0]  # deep, with partial nodes
    most = max(len(s.tree.partial[0]), 1) + cfg.recent + cfg.block_size  # the most compressed cover is tiny
    assert int(entry_counts_of(s)) <= cfg.wc_budget and most <= cfg.wc_budget
    for tok in tokens(12, seed=12).tolist():  # decoding across block completions (boundary moves)
        close(s.step(tok), s.recompute_logits())
    path = tmp_path / "deep.pt"
    s.save(path)
    loaded = MCSession.load(path, ctl)
    for x, y in zip(s.tree.levels(), loaded.tree.levels()):
        assert torch.equal(x, y)
    assert list(s.generate(10, temperature=0.0)) == list(loaded.generate(10, temperature=0.0))
    close(loaded.logits(), loaded.recompute_logits())


@pytest.mark.parametrize("partial", [True, False])
def test_refocus_shows_deep_blocks_beside_coarse_gists(partial):
    """A tight budget (W=20, K=4) cannot open the nodes above an old block, so a refocus shows LensNet's best
    blocks raw beside the coarse gists that hold them: every refocus gives the controller's selection from the
    kept scores, the table always equals the map's, and many of a long history's refocuses show such a block."""
    cfg = dataclasses.replace(CFG, wc_budget=20, partial_gists=partial)
    ctl = make_controller(cfg)
    set_lens_sign(ctl, 0)
    s = MCSession.begin(ctl, tokens(50), refocus_interval=3)
    focus, beside = s._focus_map, []

    def checked(tail_tokens, lookback):
        m = focus(tail_tokens, lookback)
        reserve = cfg.block_size - 1 - tail_tokens
        assert torch.equal(m, ctl.select(s._scores[:s.n_blocks][None], tail_tokens, reserve=reserve)[0])
        deep = torch.zeros_like(m, dtype=torch.bool)
        for level in range(2, int(m.max()) + 1):
            deep |= node_sum((m == level)[None], cfg.block_size ** (level - 1))[0] > 0
        beside.append(bool(((m == RAW) & deep).any()))
        return m

    s._focus_map = checked
    for i, _ in uneven_appends(s, tokens(1500, seed=15), [1] * 20 + [3, 7, 61]):
        if i % 25 == 0:
            check_session(s, cfg)
    check_session(s, cfg)
    assert len(beside) > 200 and sum(beside) > 0.15 * len(beside)


def entry_counts_of(s):
    from mc.working_context import entry_counts
    return entry_counts(s.lod_map[None], s.cfg.block_size, s.num_tokens % s.cfg.block_size)[0]


def test_lookback_bounds_what_a_refocus_scores(controller):
    """A refocus scores the blocks of the last `lookback` tokens afresh; older blocks keep the score of the last
    refocus that scored them. A whole-history refocus decides as evaluation does, and what it expanded stays
    expanded through the bounded refocuses that follow while it is the best use of W."""
    set_lens_sign(controller, 1)
    s = MCSession.begin(controller, tokens(800, seed=13), lookback=64)
    s._scores.fill_(float("-inf"))  # forget what the refocuses of the prompt's chunks scored
    s.refocus()
    older = s.n_blocks - CFG.recent // CFG.block_size
    expanded = (s.lod_map == 0).nonzero()[:, 0]
    assert expanded.min() >= older - 64 // CFG.block_size  # nothing older is scored
    s.refocus(lookback=s.num_tokens)  # a question: the whole history
    assert torch.equal(s.lod_map, controller.focus(s.tree.levels(), tail_tokens=0)[0])
    old_raw = (s.lod_map[:older - 64 // CFG.block_size] == 0).nonzero()[:, 0]
    assert old_raw.numel() > 0  # the whole-history focus expands blocks outside the lookback
    kept = s._scores[:older - 64 // CFG.block_size].clone()
    set_lens_sign(controller, -1)  # fresh scores now lose against the question's (all <= 0 vs >= 0)
    for tok in tokens(8, seed=14).tolist():  # appends and bounded refocuses: the old picks stay
        s.append([tok])
    s.refocus()
    assert torch.equal(s._scores[:kept.numel()], kept) and (s.lod_map[old_raw] == 0).all()
    check_session(s)
    set_lens_sign(controller, 0)
