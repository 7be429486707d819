"""Working contexts as LOD maps (docs/architecture.md §4): constructors, edits, materialisation, invariants.

Property tests run over seeded random configs (with and without partial gists), history lengths and maps
(no hypothesis needed), deep enough for LOD3 and LOD4 nodes; `materialize` is compared against a slow
pure-Python reference written here.
"""

import random

import pytest
import torch

from mc.config import MCConfig
from mc.allocator import focus_maps
from mc.tree import level_rows, partial_nodes, shown_end, tree_depth
from mc.working_context import (
    GIST, GROUP, RAW, UNCOVERED, WorkingContextError, collapse_blocks, collapse_groups, edit_cost,
    close_partial_nodes, entry_counts, entry_token_ids, expand_blocks, expand_groups, is_legal, materialize,
    most_compressed_map, open_nodes, open_partial_nodes, random_maps, validate_wc,
)

D = 3


def random_case(seed):
    """A random valid config, history (n_blocks complete blocks + t partial tokens) and batch size."""
    rng = random.Random(seed)
    K = rng.choice([4, 8, 32])
    R = K * rng.randint(1, 3)
    W = R + K * rng.randint(1, 5) + rng.randint(0, K - 1)
    cfg = MCConfig(block_size=K, recent=R, wc_budget=W, horizon=1, partial_gists=rng.random() < 0.5)
    cfg.validate()
    n_blocks = rng.randint(0, K ** 3 + 3 * K + R // K) if K == 4 else rng.randint(0, 3 * K + R // K) if K < 32 else rng.randint(0, 80)
    t = rng.randint(0, K - 1) if rng.random() < 0.5 else 0
    if n_blocks == 0:
        t = max(t, 1)
    B = rng.randint(1, 3)
    return cfg, n_blocks, t, B, rng


def make_history(cfg, n_blocks, t, B, seed):
    """Random level tensors [LOD0 [B, T, D], LOD1 [B, n, D], LOD2, ... (rows: mc.tree.level_rows)], tokens [B, T], next [B]."""
    g = torch.Generator().manual_seed(seed)
    T = n_blocks * cfg.block_size + t
    levels = [torch.randn(B, T, D, generator=g)]
    for level in range(1, tree_depth(n_blocks, cfg) + 1):
        levels.append(torch.randn(B, level_rows(n_blocks, level, cfg), D, generator=g))
    tokens = torch.randint(0, 1000, (B, T), generator=g)
    next_token = torch.randint(0, 1000, (B,), generator=g)
    return levels, tokens, next_token


def reference(lod_map, levels, tokens, next_token, sample, cfg):
    """Slow pure-Python materialisation: walk the blocks of each variant, emit entries, right-pad."""
    K, W = cfg.block_size, cfg.wc_budget
    V, T = lod_map.shape[0], tokens.shape[1]
    n = lod_map.shape[1]
    out = dict(embeds=torch.zeros(V, W, D), pos=torch.zeros(V, W, dtype=torch.long),
               span=torch.ones(V, W, dtype=torch.long), lod=torch.zeros(V, W, dtype=torch.long),
               targets=torch.full((V, W), -1, dtype=torch.long), valid=torch.zeros(V, W, dtype=torch.bool))
    for v in range(V):
        b = int(sample[v])
        entries = []  # (embed, pos, span, lod, target)

        def token_entry(p):
            target = int(tokens[b, p + 1]) if p + 1 < T else int(next_token[b])
            entries.append((levels[0][b, p], p, 1, 0, target))

        for blk in range(n):
            lod = int(lod_map[v, blk])
            for level in range(1, 8):  # the gist of the node this block starts, if that node is shown
                size = K ** (level - 1)
                if blk % size:
                    break
                node = lod_map[v, blk:blk + size].tolist()
                if level in node:
                    end = min(blk + size, shown_end(n, level, cfg)) if level >= GROUP else blk + 1
                    entries.append((levels[level][b, blk // size], blk * K, (end - blk) * K, level, -1))
                    break
            if lod == RAW:  # in place, or beside the gist of the node holding it
                for j in range(K):
                    token_entry(blk * K + j)
        for p in range(n * K, T):
            token_entry(p)
        assert len(entries) <= W
        for w, (e, p, s, lod, target) in enumerate(entries):
            out["embeds"][v, w] = e
            out["pos"][v, w], out["span"][v, w], out["lod"][v, w] = p, s, lod
            out["targets"][v, w], out["valid"][v, w] = target, True
    return out


def check_batch(lod_map, cfg, n_blocks, t, B, seed, sample=None):
    """Materialise, validate the five invariants and compare with the reference."""
    levels, tokens, next_token = make_history(cfg, n_blocks, t, B, seed)
    wc = materialize(lod_map, levels, tokens, cfg, next_token=next_token, sample=sample)
    validate_wc(wc, tokens, cfg, next_token=next_token)
    ref = reference(lod_map, levels, tokens, next_token, wc.sample, cfg)
    for name, expected in ref.items():
        assert torch.equal(getattr(wc, name), expected), name
    assert torch.equal(wc.n_entries, entry_counts(lod_map, cfg.block_size, t))
    return wc


def test_most_compressed_map_properties():
    for seed in range(200):
        cfg, n, t, B, _ = random_case(seed)
        K, W = cfg.block_size, cfg.wc_budget
        if min(n, cfg.recent // K) * K + t > W:
            with pytest.raises(ValueError, match="raw tail"):
                most_compressed_map(n, cfg, t)
            continue
        m = most_compressed_map(n, cfg, t)
        assert m.dtype == torch.int8 and m.shape == (n,)
        lod = m[None]
        assert is_legal(lod, K, cfg.recent // K, partial=cfg.partial_gists).all()
        count = int(entry_counts(lod, K, t))
        assert count <= W
        older = m[:max(0, n - cfg.recent // K)]
        assert not (older == RAW).any(), "only the raw tail is expanded"
        if (m == UNCOVERED).any():
            assert count == W, "blocks are uncovered only while the budget is exceeded"
        elif n >= cfg.recent // K:  # one entry per non-zero base-K digit of the older blocks (K per digit without partial gists)
            assert count == cfg.min_entries(n * K) + t
        assert collapse_groups(lod, torch.ones(1, -(-n // K), dtype=torch.bool), K).equal(lod)
        check_batch(lod.expand(B, n), cfg, n, t, B, seed)


def test_random_maps_are_legal_within_budget_and_match_reference():
    for seed in range(200):
        cfg, n, t, B, rng = random_case(seed)
        K, W = cfg.block_size, cfg.wc_budget
        if min(n, cfg.recent // K) * K + t > W:
            continue
        per_seq = rng.randint(1, 3)
        V = B * per_seq
        g = torch.Generator().manual_seed(seed)
        maps = random_maps(V, n, cfg, g, tail_tokens=t)
        assert maps.shape == (V, n) and maps.dtype == torch.int8
        assert is_legal(maps, K, cfg.recent // K, partial=cfg.partial_gists).all()
        counts = entry_counts(maps, K, t)
        assert (counts <= W).all()
        # the budget is used up to less than one edit, unless nothing is left to expand
        nothing_left = ~((maps == GIST) | (maps == GROUP)).any(1)
        assert ((W - counts < edit_cost(K)) | nothing_left).all()
        check_batch(maps, cfg, n, t, B, seed)


def test_random_maps_vary():
    cfg = MCConfig(block_size=4, recent=8, wc_budget=40, horizon=4)
    maps = random_maps(16, 64, cfg, torch.Generator().manual_seed(0))
    assert len({tuple(m.tolist()) for m in maps}) > 8
    assert (maps == GROUP).any() and (maps == RAW)[:, :-2].any()


def random_edits(maps, cfg, gen):
    """Random expand/collapse masks applied in sequence; returns the edited maps and the expected count change."""
    K = cfg.block_size
    V, n = maps.shape
    G = -(-n // K)
    counts0 = entry_counts(maps, K)
    masks = [torch.rand(V, n, generator=gen) < 0.3, torch.rand(V, G, generator=gen) < 0.3,
             torch.rand(V, n, generator=gen) < 0.3, torch.rand(V, G, generator=gen) < 0.5]
    m = expand_blocks(maps, masks[0])
    n_expanded = ((maps == GIST) & (m == RAW)).sum(1)
    m2 = expand_groups(m, masks[1], K)
    opened = (m == GROUP) & (m2 == GIST)  # a group of j blocks (K, or fewer when partial) adds j - 1 entries
    added = opened.sum(1) - (opened & (torch.arange(n) % K == 0)).sum(1)
    m3 = collapse_blocks(m2, masks[2], cfg.recent // K)
    n_collapsed = ((m2 == RAW) & (m3 == GIST)).sum(1)
    m4 = collapse_groups(m3, masks[3], K)
    n_collapsed += ((m3 == GIST) & (m4 == GROUP)).sum(1) // K
    expected = counts0 + edit_cost(K) * (n_expanded - n_collapsed) + added
    return m4, expected


def test_edits_keep_maps_legal_and_cost_k_minus_1():
    for seed in range(200):
        cfg, n, t, B, rng = random_case(seed)
        K, W = cfg.block_size, cfg.wc_budget
        if min(n, cfg.recent // K) * K + t > W:
            continue
        g = torch.Generator().manual_seed(seed)
        maps = random_maps(2 * B, n, cfg, g, tail_tokens=t)
        edited, expected = random_edits(maps, cfg, g)
        assert edited.dtype == maps.dtype
        assert is_legal(edited, K, cfg.recent // K, partial=cfg.partial_gists).all()
        assert torch.equal(entry_counts(edited, K), expected)
        fits = entry_counts(edited, K, t) <= W
        if fits.all():
            check_batch(edited, cfg, n, t, 2 * B, seed)
        else:
            with pytest.raises(ValueError, match="mc_wc_budget"):
                materialize(edited, *make_history(cfg, n, t, 2 * B, seed)[:2], cfg)


def test_edit_primitives_exact():
    K = 4
    m = torch.tensor([[2, 2, 2, 2, 1, 1, 1, 1, 1, 0]], dtype=torch.int8)
    assert expand_groups(m, torch.tensor([[True, False, False]]), K).tolist() == [[1] * 9 + [0]]
    assert expand_blocks(m, torch.ones(1, 10, dtype=torch.bool)).tolist() == [[2, 2, 2, 2, 0, 0, 0, 0, 0, 0]]
    assert collapse_groups(m, torch.ones(1, 3, dtype=torch.bool), K).tolist() == [[2] * 8 + [1, 0]]
    assert collapse_groups(m, torch.ones(1, 2, dtype=torch.bool), K).tolist() == [[2] * 8 + [1, 0]]
    assert collapse_blocks(m, torch.ones(1, 10, dtype=torch.bool), 1).equal(m)  # the tail block stays raw
    assert collapse_blocks(m, torch.ones(1, 10, dtype=torch.bool), 0).tolist() == [[2, 2, 2, 2] + [1] * 6]


def test_is_legal_rejects_each_violation():
    K = 4
    ok = [2, 2, 2, 2, 1, 0, 0]
    bad = {
        "misaligned group": [1, 2, 2, 2, 2, 0, 0],
        "incomplete group": [2, 2, 2, 1, 1, 0, 0],
        "uncovered after covered": [1, -1, 1, 1, 1, 0, 0],
        "raw tail gist": [2, 2, 2, 2, 1, 0, 1],
        "unknown value": [-2, 2, 2, 2, 1, 0, 0],
        "LOD3 node not in the tree": [3, 3, 3, 3, 1, 0, 0],
    }
    assert is_legal(torch.tensor([ok, [-1, -1, -1, -1, 1, 0, 0]]), K, 2).all()
    legal = is_legal(torch.tensor(list(bad.values())), K, 2)
    assert not legal.any(), [k for k, v in zip(bad, legal) if v]
    assert not is_legal(torch.tensor([ok]), K, 2, max_lod=1).any()


def test_targets_and_padding_explicit():
    K = 4
    cfg = MCConfig(block_size=K, recent=4, wc_budget=20, horizon=1)
    n, t, B = 8, 2, 1  # T = 34
    lod_map = torch.tensor([[2, 2, 2, 2, 1, 0, 1, 0]], dtype=torch.int8)  # block 5 expanded mid-history
    levels, tokens, next_token = make_history(cfg, n, t, B, 0)
    wc = materialize(lod_map, levels, tokens, cfg, next_token=next_token)
    n_real = 1 + 1 + K + 1 + K + t
    assert int(wc.n_entries) == n_real
    assert wc.pos[0, :n_real].tolist() == [0, 16, 20, 21, 22, 23, 24, 28, 29, 30, 31, 32, 33]
    assert wc.lod[0, :n_real].tolist() == [2, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert wc.span[0, :n_real].tolist() == [16, 4, 1, 1, 1, 1, 4, 1, 1, 1, 1, 1, 1]
    assert wc.targets[0, 2:6].tolist() == tokens[0, 21:25].tolist()  # the expanded block predicts its next tokens
    assert wc.targets[0, [0, 1, 6]].tolist() == [-1, -1, -1]  # gists predict nothing
    assert int(wc.targets[0, n_real - 1]) == int(next_token[0])  # the last raw token predicts next_token
    assert not wc.valid[0, n_real:].any() and (wc.targets[0, n_real:] == -1).all()
    assert (wc.embeds[0, n_real:] == 0).all()
    assert torch.equal(wc.embeds[0, 0], levels[2][0, 0]) and torch.equal(wc.embeds[0, 1], levels[1][0, 4])
    no_next = materialize(lod_map, levels, tokens, cfg)
    assert int(no_next.targets[0, n_real - 1]) == -1


def test_variants_read_their_sample():
    cfg = MCConfig(block_size=4, recent=8, wc_budget=24, horizon=1)
    n, B = 16, 3
    levels, tokens, next_token = make_history(cfg, n, 0, B, 1)
    maps = random_maps(2 * B, n, cfg, torch.Generator().manual_seed(1))
    wc = check_batch(maps, cfg, n, 0, B, 1)
    assert wc.sample.tolist() == [0, 0, 1, 1, 2, 2]
    variant_major = torch.tensor([0, 1, 2, 0, 1, 2])
    wc = check_batch(maps, cfg, n, 0, B, 1, sample=variant_major)
    last = wc.n_entries - 1
    assert torch.equal(wc.embeds[torch.arange(6), last], levels[0][variant_major, -1])
    with pytest.raises(ValueError, match="variants"):
        materialize(maps[:5], levels, tokens, cfg)


def test_materialize_rejects_bad_maps():
    cfg = MCConfig(block_size=4, recent=8, wc_budget=16, horizon=1)
    levels, tokens, _ = make_history(cfg, 8, 0, 1, 2)
    with pytest.raises(ValueError, match="needs 17 entries > --mc_wc_budget=16"):
        materialize(torch.tensor([[2, 2, 2, 2, 0, 0, 0, 0]]), levels, tokens, cfg)
    with pytest.raises(ValueError, match="illegal"):
        materialize(torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]]), levels, tokens, cfg)
    with pytest.raises(ValueError, match="illegal"):  # LOD2 without an LOD2 level
        materialize(torch.tensor([[2, 2, 2, 2, 1, 1, 0, 0]]), levels[:2], tokens, cfg)
    with pytest.raises(ValueError, match="does not match"):
        materialize(torch.tensor([[1, 1, 1, 0, 0]]), levels, tokens, cfg)


def test_gradients_reach_every_level():
    cfg = MCConfig(block_size=8, recent=16, wc_budget=40, horizon=1)
    n, B = 20, 2
    levels, tokens, next_token = make_history(cfg, n, 5, B, 3)
    levels = [lvl.requires_grad_() for lvl in levels]
    maps = random_maps(4, n, cfg, torch.Generator().manual_seed(3), tail_tokens=5)
    wc = materialize(maps, levels, tokens, cfg, next_token=next_token)
    validate_wc(wc, tokens, cfg, next_token)
    (wc.embeds * torch.randn_like(wc.embeds)).sum().backward()
    shown = [level for level in range(len(levels)) if (wc.valid & (wc.lod == level)).any()]
    assert len(shown) >= 2 and all(levels[level].grad.abs().sum() > 0 for level in shown)


def test_follows_levels_dtype():
    cfg = MCConfig(block_size=4, recent=8, wc_budget=24, horizon=1)
    levels, tokens, _ = make_history(cfg, 16, 0, 2, 4)
    levels = [lvl.to(torch.bfloat16) for lvl in levels]
    wc = materialize(random_maps(2, 16, cfg, torch.Generator().manual_seed(4)), levels, tokens, cfg)
    assert wc.embeds.dtype == torch.bfloat16 and wc.pos.dtype == torch.long and wc.valid.dtype == torch.bool


def test_validate_wc_catches_each_violation():
    cfg = MCConfig(block_size=4, recent=4, wc_budget=20, horizon=1)
    lod_map = torch.tensor([[2, 2, 2, 2, 1, 0, 1, 0]], dtype=torch.int8)
    levels, tokens, next_token = make_history(cfg, 8, 2, 1, 5)
    good = materialize(lod_map, levels, tokens, cfg, next_token=next_token)
    validate_wc(good, tokens, cfg, next_token)

    def broken(**changes):
        fields = {k: getattr(good, k).clone() if torch.is_tensor(getattr(good, k)) else getattr(good, k)
                  for k in good.__dataclass_fields__}
        for name, (index, value) in changes.items():
            fields[name][index] = value
        return type(good)(**fields)

    cases = [
        (broken(pos=((0, 1), 17)), "1 \\(alignment\\)"),          # LOD1 gist not at a multiple of K
        (broken(span=((0, 1), 5)), "1 \\(alignment\\)"),
        (broken(pos=((0, 3), 22), targets=((0, 3), int(tokens[0, 23]))), "2 \\(coverage\\)"),  # overlap
        (broken(valid=((0, 12), False), targets=((0, 12), -1)), "2 \\(coverage\\)"),  # ends before T
        (broken(lod=((0, 10), 1), span=((0, 10), 4), pos=((0, 10), 28)), "1 \\(alignment\\)|2 \\(coverage\\)"),
        (broken(targets=((0, 2), 7)), "5 \\(targets\\)"),
        (broken(targets=((0, 1), 7)), "5 \\(targets\\)"),             # a gist with a target
        (broken(valid=((0, 5), False)), "right padding"),
        (broken(targets=((0, 15), 3)), "right padding"),
    ]
    for wc, pattern in cases:
        with pytest.raises(WorkingContextError, match=pattern):
            validate_wc(wc, tokens, cfg, next_token)
    with pytest.raises(WorkingContextError, match="3 \\(budget\\)"):
        validate_wc(good, tokens, MCConfig(block_size=4, recent=4, wc_budget=16, horizon=1), next_token)
    with pytest.raises(WorkingContextError, match="4 \\(tail\\)"):
        validate_wc(good, tokens, MCConfig(block_size=4, recent=12, wc_budget=20, horizon=1), next_token)


def test_partial_nodes_open_and_go_stale():
    """K=4, R=8, partial gists: 16 blocks, 14 older = 3 LOD2 nodes + 2 blocks -> a LOD3 partial of 3 LOD2 nodes and a
    LOD2 partial of 2 blocks: 2 entries + the raw tail. One more block moves the boundary: the LOD2 partial of 2
    blocks is no longer a node of the tree and is opened into its gists."""
    K = 4
    cfg = MCConfig(block_size=K, recent=8, wc_budget=24, horizon=1, partial_gists=True)
    m = most_compressed_map(16, cfg)[None]
    assert m.tolist() == [[3] * 12 + [2] * 2 + [0] * 2] and int(entry_counts(m, K)) == 2 + 8
    check_batch(m, cfg, 16, 0, 1, 0)
    opened = open_nodes(m, torch.arange(16)[None] == 5, K)  # block 5: LOD3 node 0, then LOD2 node 1
    assert opened.tolist() == [[2] * 4 + [1] * 4 + [2] * 6 + [0] * 2]
    assert is_legal(opened, K, 2, partial=True).all() and int(entry_counts(opened, K)) == 1 + 4 + 1 + 1 + 8
    grown = torch.cat([m, m.new_zeros(1, 1)], 1)  # block 16 completes: 15 older blocks
    # the map now reads as the new partial node of 3 children with block 14 raw beside its gist (a stale gist:
    # the session opens the node it showed, below); without partial gists it is no node of the tree
    assert is_legal(grown, K, 2, partial=True).all() and is_legal(grown, K, 2).tolist() == [False]
    assert int(entry_counts(grown, K)) == 1 + 1 + 4 + 8
    assert partial_nodes(16, cfg) == [(2, 3, 2), (3, 0, 3)] and partial_nodes(17, cfg) == [(2, 3, 3), (3, 0, 3)]
    fixed = open_partial_nodes(grown, [(2, 3, 2)], K)  # the node whose gist the tree replaced
    assert fixed.tolist() == [[3] * 12 + [1] * 2 + [0] * 3] and is_legal(fixed, K, 2, partial=True).all()
    assert torch.equal(open_partial_nodes(fixed, [(2, 3, 2)], K), fixed)  # not shown: nothing to open
    assert most_compressed_map(17, cfg).tolist() == [3] * 12 + [2] * 3 + [0] * 2
    # without partial gists the incomplete group is shown as its gists, K - 1 entries at most per level
    plain = most_compressed_map(16, MCConfig(block_size=K, recent=8, wc_budget=24, horizon=1, partial_gists=False))
    assert plain.tolist() == [2] * 12 + [1] * 2 + [0] * 2


def test_close_partial_nodes_shows_untouched_partial_nodes_as_one_entry():
    """The cover without partial nodes, closed, is the partial cover (for random histories); a node with a child
    expanded stays open; closing what `open_partial_nodes` opened gives the map back."""
    rng = random.Random(0)
    for _ in range(50):
        K = rng.choice([2, 3, 4])
        cfg = MCConfig(block_size=K, recent=K * rng.randint(1, 2), wc_budget=200, horizon=1, partial_gists=True)
        n = rng.randint(1, 90)
        nodes = partial_nodes(n, cfg)
        per_level = most_compressed_map(n, MCConfig(block_size=K, recent=cfg.recent, wc_budget=200, horizon=1))[None]
        assert torch.equal(close_partial_nodes(per_level, nodes, K), most_compressed_map(n, cfg)[None]), (K, n)
        partial_cover = most_compressed_map(n, cfg)[None]
        assert torch.equal(close_partial_nodes(open_partial_nodes(partial_cover, nodes, K), nodes, K), partial_cover)
    K = 4
    cfg = MCConfig(block_size=K, recent=8, wc_budget=40, horizon=1, partial_gists=True)
    nodes = partial_nodes(16, cfg)  # [(2, 3, 2), (3, 0, 3)]
    touched = expand_blocks(torch.tensor([[2] * 12 + [1] * 2 + [0] * 2], dtype=torch.int8), torch.arange(16)[None] == 12)
    closed = close_partial_nodes(touched, nodes, K)
    assert closed.tolist() == [[3] * 12 + [0, 1] + [0] * 2] and is_legal(closed, K, 2, partial=True).all()


def test_entry_token_ids_are_tokens_of_raw_entries_only():
    """A GPT with value embeddings reads each entry's token: raw entries give theirs, gists and padding -1."""
    cfg = MCConfig(block_size=4, recent=8, wc_budget=16, horizon=1)
    K, T = cfg.block_size, 8 * cfg.block_size
    tokens = torch.randint(0, 50, (2, T))
    levels = [torch.randn(2, T, D), torch.randn(2, T // K, D), torch.randn(2, T // K ** 2, D)]
    maps = most_compressed_map(T // K, cfg).expand(2, -1)
    wc = materialize(maps, levels, tokens, cfg)
    ids = entry_token_ids(wc.pos, wc.lod, tokens, wc.valid, wc.sample)
    raw = (wc.lod == 0) & wc.valid
    assert torch.equal(ids[raw], tokens[wc.sample[:, None].expand_as(wc.pos)[raw], wc.pos[raw]])
    assert (ids[~raw] == -1).all() and (~raw & wc.valid).any()


@pytest.mark.parametrize("seed", range(40))
def test_blocks_shown_beside_coarse_gists_materialize_exactly(seed):
    """Maps with raw blocks beside the gists of the nodes holding them (the inference focus on random scores, and
    the same picks with nothing opened) are legal, fit W, and materialise as the reference: each gist, then the
    raw tokens of the blocks beside it, in order."""
    cfg, n, t, B, rng = random_case(seed)
    if cfg.min_entries(n * cfg.block_size + t) > cfg.wc_budget or n == 0:
        return
    g = torch.Generator().manual_seed(seed)
    base = most_compressed_map(n, cfg, t).expand(B, n)
    scores = torch.randn(B, n, generator=g)
    scores[:, n - min(cfg.recent // cfg.block_size, n):] = float("-inf")
    maps = focus_maps(base, scores, cfg, t)
    beside = torch.where((base >= GIST) & (maps == RAW), RAW, base)  # the picks, no node opened
    for m in (maps, beside):
        if int(entry_counts(m, cfg.block_size, t).max()) <= cfg.wc_budget:
            assert is_legal(m, cfg.block_size, cfg.recent // cfg.block_size, partial=cfg.partial_gists).all()
            check_batch(m, cfg, n, t, B, seed)
