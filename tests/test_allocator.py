"""Focus allocator (docs/architecture.md §5): legal budgeted edits from scores, policies and baselines.

A seeded loop over random configs, maps and scores checks the properties every edit_maps call must keep
(legal maps, budget W, at most max_edits edits of each kind, greedy = the best candidates);
small hand-built cases check the exact choices, thresholds, collapses and baselines.
"""

import random

import pytest
import torch

from mc.allocator import (edit_maps, expanded_units, focus_maps, oracle_maps, read_on_scores, recency_scores,
                          similarity_scores, unit_scores)
from mc.config import MCConfig
from mc.tree import level_rows, tree_depth
from mc.working_context import (GIST, GROUP, RAW, UNCOVERED, collapse_blocks, edit_cost, entry_counts, expand_blocks,
                                expand_groups, is_legal, materialize, most_compressed_map, random_maps)

D = 3


def history(cfg, B, n_blocks, t=0, seed=0):
    """Random levels [LOD0 [B, T, D], LOD1 [B, n, D], LOD2, ...] and tokens [B, T] of a history of n blocks + t tokens."""
    g = torch.Generator().manual_seed(seed)
    T = n_blocks * cfg.block_size + t
    levels = [torch.randn(B, T, D, generator=g)]
    for level in range(1, tree_depth(n_blocks, cfg) + 1):
        levels.append(torch.randn(B, level_rows(n_blocks, level, cfg), D, generator=g))
    return levels, torch.randint(0, 100, (B, T), generator=g)


def wc_of(maps, cfg, t=0, seed=0):
    """Materialised WCs of maps [V, n] (one history row per variant)."""
    V, n = maps.shape
    levels, tokens = history(cfg, V, n, t, seed)
    return materialize(maps, levels, tokens, cfg, sample=torch.arange(V))


def random_case(seed):
    """A random config (K in {4, 8}), legal maps within budget (some with room to expand), entry scores."""
    rng = random.Random(seed)
    K = rng.choice([4, 8])
    R = K * rng.randint(1, 2)
    W = R + K * rng.randint(2, 6) + rng.randint(0, K - 1)
    cfg = MCConfig(block_size=K, recent=R, wc_budget=W, horizon=1, partial_gists=rng.random() < 0.5,
                   max_edits=rng.randint(1, 4), top_k=rng.randint(1, 6),
                   expand_threshold=rng.choice([0.0, 0.0, 0.5]), collapse_threshold=rng.choice([0.0, 0.0, 0.5]))
    cfg.validate()
    n = rng.randint(R // K, 3 * K + R // K)
    t = rng.choice([0, 0, rng.randint(1, K - 1)])
    if min(n, R // K) * K + t > W:
        t = 0
    g = torch.Generator().manual_seed(seed)
    V = rng.randint(1, 4)
    maps = random_maps(V, n, cfg, g, tail_tokens=t)
    maps = collapse_blocks(maps, torch.rand(V, n, generator=g) < 0.4, R // K)  # free some budget
    wc = wc_of(maps, cfg, t, seed)
    scores = torch.where(wc.valid, 2 * torch.randn(wc.valid.shape, generator=g), 0.0)
    return cfg, maps, wc, scores, t, g


def n_edits(old, new, K):
    """(expanded blocks, expanded groups, collapsed blocks, new groups) [V] between two maps [V, n]."""
    V, n = old.shape
    G = n // K
    grouped = lambda m: m[:, :G * K].view(V, G, K)[..., 0] == GROUP  # noqa: E731  [V, G]
    return ((old == GIST) & (new == RAW)).sum(1), (grouped(old) & ~grouped(new)).sum(1), \
        ((old == RAW) & (new != RAW)).sum(1), (grouped(new) & ~grouped(old)).sum(1)


def test_refocus_keeps_maps_legal_and_within_budget():
    cases = 0
    for seed in range(100):
        cfg, maps, wc, scores, t, g = random_case(seed)
        K, W = cfg.block_size, cfg.wc_budget
        for policy in ("greedy", "stochastic_greedy"):
            for allow_collapse in (True, False):
                new = edit_maps(maps, scores, wc, cfg, policy, g, tail_tokens=t, allow_collapse=allow_collapse)
                assert new.shape == maps.shape and new.dtype == maps.dtype
                assert is_legal(new, K, cfg.recent // K, partial=cfg.partial_gists).all(), (seed, policy, new.tolist())
                assert (entry_counts(new, K, t) <= W).all(), seed
                assert torch.equal(new == UNCOVERED, maps == UNCOVERED)  # edit_maps never uncovers or re-covers
                exp_b, exp_g, col_b, col_g = n_edits(maps, new, K)
                assert (exp_b + exp_g <= cfg.max_edits).all()
                assert (col_b <= cfg.max_edits).all() and (col_g <= cfg.max_edits).all()
                if not allow_collapse:
                    assert not col_b.any() and not col_g.any()
                materialize(new, *history(cfg, maps.size(0), maps.size(1), t), cfg, sample=torch.arange(maps.size(0)))
                cases += 1
    assert cases == 400


def test_greedy_expands_the_best_candidates():
    """Without collapses, greedy expands exactly min(candidates, max_edits, free // (K-1)) units, the best-scored."""
    for seed in range(100):
        cfg, maps, wc, scores, t, g = random_case(seed)
        K, W = cfg.block_size, cfg.wc_budget
        V, n = maps.shape
        G = -(-n // K)  # groups, a partial one included
        new = edit_maps(maps, scores, wc, cfg, "greedy", tail_tokens=t, allow_collapse=False)
        gist_block, group_entry, _, _ = unit_scores(scores, wc, K)
        unit_score = torch.cat([gist_block, group_entry], 1)  # [V, n + G]
        first = torch.cat([maps, maps.new_full((V, G * K - n), RAW)], 1).view(V, G, K)[..., 0]
        is_unit = torch.cat([maps == GIST, first == GROUP], 1)
        candidate = is_unit & (unit_score > cfg.expand_threshold)
        blocks, groups = expanded_units(new, maps, K)
        expanded = torch.cat([blocks, groups], 1)
        assert not (expanded & ~candidate).any(), "only candidates above the threshold are expanded"
        free = W - entry_counts(maps, K, t)
        want = torch.minimum(torch.minimum(candidate.sum(1), free // edit_cost(K)), torch.tensor(cfg.max_edits))
        assert torch.equal(expanded.sum(1), want), seed
        for v in range(V):
            chosen, left = unit_score[v][expanded[v]], unit_score[v][candidate[v] & ~expanded[v]]
            if len(chosen) and len(left):
                assert chosen.min() >= left.max(), seed


def line_cfg(**kw):
    """K=4 and a map of single blocks (`line_map`), so each candidate is a block."""
    base = dict(block_size=4, recent=4, wc_budget=4 + 10 + 3 * 3, horizon=1, max_edits=3)
    return MCConfig(**{**base, **kw})


def line_map(n):
    """[1, n]: n - 1 LOD1 gists and the raw tail block."""
    return torch.tensor([[GIST] * (n - 1) + [RAW]], dtype=torch.int8)


def gist_scores(wc, block_scores, K=4):
    """Entry scores [1, W]: block_scores[b] on the LOD1 gist entry of block b, 0 elsewhere."""
    block = torch.where(wc.valid & (wc.lod == 1), wc.pos // K, -1)[0]
    s = torch.zeros_like(wc.pos, dtype=torch.float)
    for b, value in enumerate(block_scores):
        s[0, block == b] = value
    return s


def test_greedy_picks_highest_scores_within_budget_and_max_edits():
    cfg = line_cfg()
    maps = line_map(11)  # 10 gists + 1 raw tail block = 14 entries, free 9 = 3 edits
    wc = wc_of(maps, cfg)
    s = [0.1, 0.9, -1.0, 0.5, 0.7, 0.2, 0.8, 0.0, 0.3, 0.4]
    new = edit_maps(maps, gist_scores(wc, s), wc, cfg, "greedy")
    assert (new[0, :10] == RAW).nonzero().view(-1).tolist() == [1, 4, 6]
    # a tighter budget affords two, max_edits=1 one
    new = edit_maps(maps, gist_scores(wc, s), wc, line_cfg(wc_budget=4 + 10 + 6), "greedy")
    assert (new[0, :10] == RAW).nonzero().view(-1).tolist() == [1, 6]
    new = edit_maps(maps, gist_scores(wc, s), wc, line_cfg(max_edits=1), "greedy")
    assert (new[0, :10] == RAW).nonzero().view(-1).tolist() == [1]
    # the default threshold (-inf) spends the budget whatever the sign of the scores (collapses aside); threshold 0 keeps
    # non-positive scores unexpanded, even with budget to spare
    new = edit_maps(maps, gist_scores(wc, [-0.5] * 9 + [-0.2]), wc, cfg, "greedy", allow_collapse=False)
    assert (new[0, :10] == RAW).sum() == 3 and new[0, 9] == RAW
    new = edit_maps(maps, gist_scores(wc, [0.0] * 9 + [0.2]), wc, line_cfg(expand_threshold=0.0), "greedy")
    assert (new[0, :10] == RAW).nonzero().view(-1).tolist() == [9]


def test_groups_compete_with_blocks():
    cfg = MCConfig(block_size=4, recent=4, wc_budget=4 + 3 + 3, horizon=1, partial_gists=False, max_edits=8)  # 2 groups + 1 tail
    maps = most_compressed_map(9, cfg)[None]
    assert maps.tolist() == [[2] * 8 + [0]]
    wc = wc_of(maps, cfg)
    scores = torch.where(wc.valid & (wc.lod == 2), torch.where(wc.pos == 0, 0.3, 0.6), 0.0)
    new = edit_maps(maps, scores, wc, cfg, "greedy")  # budget for one edit: the better group
    assert new.tolist() == [[2, 2, 2, 2, 1, 1, 1, 1, 0]]


def test_thresholds():
    cfg = line_cfg(expand_threshold=0.5)
    maps = line_map(11)
    wc = wc_of(maps, cfg)
    new = edit_maps(maps, gist_scores(wc, [0.4, 0.6, 0.5, 0.9] + [0.0] * 6), wc, cfg, "greedy")
    assert (new[0, :10] == RAW).nonzero().view(-1).tolist() == [1, 3]
    # collapse only below -collapse_threshold
    cfg = line_cfg(collapse_threshold=0.5, expand_threshold=0.0, max_edits=8, wc_budget=44)
    maps = torch.tensor([[RAW] * 6 + [GIST] * 4 + [RAW]], dtype=torch.int8)
    wc = wc_of(maps, cfg)
    block_score = torch.tensor([-0.4, -0.6, -0.5, -0.9, 0.0, -2.0] + [0.0] * 5)
    scores = torch.where(wc.valid & (wc.lod == 0), block_score[(wc.pos // 4).clamp(max=10)], 0.0)
    new = edit_maps(maps, scores, wc, cfg, "greedy")
    assert new.tolist() == [[RAW, GIST, RAW, GIST, RAW, GIST] + [GIST] * 4 + [RAW]]


def test_negative_scores_collapse_raw_blocks_and_all_gist_groups():
    K = 4
    cfg = MCConfig(block_size=K, recent=2 * K, wc_budget=200, horizon=1, max_edits=8, expand_threshold=0.0)
    # group 0 all gists, group 1 raw, then 2 loose gists and the 2-block raw tail
    maps = torch.tensor([[GIST] * 4 + [RAW] * 4 + [GIST, GIST, RAW, RAW]], dtype=torch.int8)
    assert is_legal(maps, K, 2).all()
    wc = wc_of(maps, cfg)
    scores = torch.where(wc.valid, -1.0, 0.0)
    new = edit_maps(maps, scores, wc, cfg, "greedy")
    # raw blocks outside the tail become gists, the all-gist group 0 collapses, the tail stays raw
    assert new.tolist() == [[GROUP] * 4 + [GIST] * 4 + [GIST, GIST, RAW, RAW]]
    assert is_legal(new, K, 2).all()
    # allow_collapse=False leaves the map alone (nothing positive to expand)
    assert torch.equal(edit_maps(maps, scores, wc, cfg, "greedy", allow_collapse=False), maps)
    # max_edits bounds the collapses, the most negative first
    cfg1 = MCConfig(block_size=K, recent=2 * K, wc_budget=200, horizon=1, max_edits=1, expand_threshold=0.0)
    raw_score = torch.tensor([0, 0, 0, 0, -1, -3, -1, -2, 0, 0, 0, 0], dtype=torch.float)
    scores = torch.where(wc.valid & (wc.lod == 0), raw_score[(wc.pos // K).clamp(max=11)], torch.where(wc.valid, -0.5, 0.0))
    new = edit_maps(maps, scores, wc, cfg1, "greedy")
    assert ((maps == RAW) & (new == GIST)).nonzero()[:, 1].tolist() == [5]
    assert new[0, :4].tolist() == [GROUP] * 4
    # positive scores on the tail never collapse it, negative ones neither
    assert (edit_maps(maps, torch.where(wc.valid, -5.0, 0.0), wc, cfg, "greedy")[0, -2:] == RAW).all()


def test_stochastic_greedy_samples_among_top_k_reproducibly():
    cfg = line_cfg(allocator="stochastic_greedy", top_k=3, max_edits=2, temperature=1.0)
    maps = line_map(11)
    wc = wc_of(maps, cfg)
    s = [0.1, 0.9, 0.3, 0.5, 0.7, 0.2, 0.8, 0.05, 0.3, 0.4]  # top-3: blocks 1, 6, 4
    scores = gist_scores(wc, s)
    seen = set()
    for seed in range(60):
        new = edit_maps(maps, scores, wc, cfg, "stochastic_greedy", torch.Generator().manual_seed(seed))
        picked = tuple((new[0, :10] == RAW).nonzero().view(-1).tolist())
        assert len(picked) == 2 and set(picked) <= {1, 4, 6}, picked
        again = edit_maps(maps, scores, wc, cfg, "stochastic_greedy", torch.Generator().manual_seed(seed))
        assert torch.equal(new, again)
        seen.add(picked)
    assert len(seen) == 3, "every pair of the top-3 is sampled sometimes"
    # a batch of variants draws independently; a tiny temperature is greedy
    many = edit_maps(maps.expand(16, -1), scores.expand(16, -1), wc_of(maps.expand(16, -1).clone(), cfg), cfg,
                   "stochastic_greedy", torch.Generator().manual_seed(0))
    assert len({tuple(m.tolist()) for m in many}) > 1
    cold = edit_maps(maps, scores, wc, line_cfg(top_k=3, max_edits=2, temperature=1e-4), "stochastic_greedy",
                   torch.Generator().manual_seed(0))
    assert (cold[0, :10] == RAW).nonzero().view(-1).tolist() == [1, 6]
    with pytest.raises(ValueError, match="policy"):
        edit_maps(maps, scores, wc, cfg, "telepathy")


def test_oracle_maps_show_answer_blocks_then_open_their_nodes():
    K = 4
    cfg = MCConfig(block_size=K, recent=2 * K, wc_budget=33, horizon=1, partial_gists=False)
    n = 36  # most compressed: 2 LOD3 nodes (blocks 0-15, 16-31) + 2 loose gists + 8 tail tokens = 12 entries
    base = most_compressed_map(n, cfg)
    assert base.tolist() == [3] * 32 + [GIST] * 2 + [RAW] * 2
    answer = torch.zeros(2, n, dtype=torch.long)
    answer[0, 5] = 1  # inside LOD3 node 0 and its group 1 -> shown raw, then node and group opened (+9)
    answer[1, [2, 17, 33]] = 1  # both LOD3 nodes, groups 0 and 4, blocks 2, 17 and loose gist 33 (+21)
    maps = oracle_maps(n, cfg, answer)
    assert is_legal(maps, K, 2).all() and (entry_counts(maps, K) == torch.tensor([21, 33])).all()
    assert (maps[answer > 0] == RAW).all()
    assert maps[0, 4:8].tolist() == [GIST, RAW, GIST, GIST]
    assert maps[1, 0:4].tolist() == [GIST, GIST, RAW, GIST] and maps[1, 16:20].tolist() == [GIST, RAW, GIST, GIST]
    blocks, groups = expanded_units(maps, base.expand(2, n), K)
    assert not groups.any()  # LOD3 nodes are not LOD2 units
    assert blocks.nonzero().tolist() == [[1, 33]]
    assert (maps[0, :4] == GROUP).all() and (maps[0, 8:16] == GROUP).all() and (maps[0, 16:32] == 3).all()
    # answers in the raw tail cost nothing
    tail = torch.zeros(1, n, dtype=torch.long)
    tail[0, -1] = 1
    assert torch.equal(oracle_maps(n, cfg, tail)[0], base)
    # three answers whose nodes cannot all open: the last stays raw beside its LOD3 gist (4 entries, not 9)
    over = torch.zeros(1, n, dtype=torch.long)
    over[0, [1, 9, 17]] = 1
    m = oracle_maps(n, cfg, over)
    assert (m[over > 0] == RAW).all() and int(entry_counts(m, K)) == 31 <= 33
    assert m[0, 16:32].tolist() == [3] + [RAW] + [3] * 14 and (m[0, [0, 2, 3, 8, 10, 11]] == GIST).all()
    wc_of(m, cfg)  # materialises: the LOD3 gist, then block 17's tokens
    # more evidence first, then the earlier block
    ranked = torch.zeros(1, n, dtype=torch.long)
    ranked[0, [1, 9, 17, 25, 33]] = torch.tensor([1, 1, 3, 1, 2])
    tight = MCConfig(block_size=K, recent=2 * K, wc_budget=23, horizon=1, partial_gists=False)  # 11 to spend
    assert (oracle_maps(n, tight, ranked)[0, :34] == RAW).nonzero().view(-1).tolist() == [1, 17, 33]


def test_focus_maps_show_the_best_blocks_raw_then_open_their_nodes():
    K = 4
    cfg = MCConfig(block_size=K, recent=2 * K, wc_budget=33, horizon=1, partial_gists=False, read_on=False, recency_bonus=0.0)
    n = 36  # most compressed: 2 LOD3 nodes (blocks 0-31) + 2 loose gists + 8 tail tokens = 12 entries; 21 to spend
    base = most_compressed_map(n, cfg).expand(3, n)
    scores = torch.full((3, n), float("-inf"))
    scores[0, [5, 6, 33]] = torch.tensor([3.0, 2.0, 1.0])  # 5, 6 beside LOD3 node 0 (4 each), gist 33 in place (3)
    scores[1, [9, 17, 2, 33]] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # 15 entries: all four fit; then 9's nodes open
    scores[2] = torch.arange(n, dtype=torch.float)  # every block ranked: the raw tail is never a candidate
    maps = focus_maps(base, scores, cfg)
    assert is_legal(maps, K, 2).all() and (entry_counts(maps, K) <= 33).all()
    # row 0: the picks' nodes open (LOD3 node 0, group 1: +6, the two blocks then in place: -2)
    assert maps[0, 4:8].tolist() == [GIST, RAW, RAW, GIST] and maps[0, 33] == RAW and entry_counts(maps[:1], K) == 27
    assert (maps[0, :4] == GROUP).all() and (maps[0, 8:16] == GROUP).all() and (maps[0, 16:32] == 3).all()
    # row 1: 9's nodes open (+5: 32 entries); 17 stays beside LOD3 node 1's gist, 2 beside group 0's
    assert maps[1, 8:12].tolist() == [GIST, RAW, GIST, GIST] and maps[1, 33] == RAW and entry_counts(maps[1:2], K) == 32
    assert maps[1, 0:4].tolist() == [GROUP, GROUP, RAW, GROUP] and maps[1, 16:20].tolist() == [3, RAW, 3, 3]
    # row 2: the loose gists (3 each), 31, 30, 29 (4 each, 18 in all); then LOD3 node 1 and group 7 open (+6 - 3)
    assert maps[2, 32:].tolist() == [RAW] * 4 and maps[2, 28:32].tolist() == [GIST, RAW, RAW, RAW]
    assert (maps[2, :16] == 3).all() and (maps[2, 16:28] == GROUP).all() and entry_counts(maps[2:], K) == 33
    wc_of(maps, cfg)
    # no candidate scored: nothing changes
    assert torch.equal(focus_maps(base, torch.full((3, n), float("-inf")), cfg), base)
    # a block deep in the tree costs K entries beside its node's gist, not the path of nodes above it
    tight = MCConfig(block_size=K, recent=2 * K, wc_budget=20, horizon=1, partial_gists=False, read_on=False, recency_bonus=0.0)  # 8 to spend
    scores = torch.full((1, n), float("-inf"))
    scores[0, [5, 33]] = torch.tensor([2.0, 1.0])  # block 5 with its nodes opened would need 9
    m = focus_maps(most_compressed_map(n, tight)[None], scores, tight)
    assert m[0, 5] == RAW and m[0, 33] == RAW and int(entry_counts(m, K)) == 19
    assert (m[0, :32] == 3).sum() == 31
    # a history that fits W raw is shown raw (as truncation shows it): 3 picks beside the partial gist would need 12
    # entries, 1 more than W leaves; opened, the third costs K-1 and fits
    short = MCConfig(block_size=K, recent=2 * K, wc_budget=20, horizon=1)
    base = most_compressed_map(5, short)[None]
    assert base.tolist() == [[GROUP] * 3 + [RAW] * 2] and int(entry_counts(base, K)) == 9
    ranked = torch.tensor([[1.0, 3.0, 2.0, float("-inf"), float("-inf")]])
    assert (focus_maps(base, ranked, short) == RAW).all()
    # a session's reserve for its partial block: the picks stay, the third step leaves the room free
    assert focus_maps(base, ranked, short, reserve=3).tolist() == [[GIST, RAW, RAW, RAW, RAW]]


@pytest.mark.parametrize("K", [2, 3, 4])
def test_focus_maps_show_a_prefix_of_the_ranking_as_long_as_fits(K):
    """Over histories up to 200 blocks (LOD4+), with and without partial gists, tight and roomy budgets: the map is
    legal and fits W, the raw tail stays raw, and the blocks shown raw are a prefix of the ranking, at least as long
    as the prefix whose costs in the most compressed map (K beside a coarse gist, K-1 in place) fit, and so long
    that the next block would not fit the final map."""
    g = torch.Generator().manual_seed(K)
    deep = 0
    for partial in (True, False):
        for W in (2 * K + K - 1, 5 * K, 9 * K):
            cfg = MCConfig(block_size=K, recent=2 * K, wc_budget=W, horizon=1, partial_gists=partial, read_on=False,
                           recency_bonus=0.0)
            for n in range(0, 200, 3):
                t = n % K if 2 * K + n % K <= W else 0
                scores = torch.randn(2, n, generator=g)
                scores[torch.rand(2, n, generator=g) < 0.2] = float("-inf")
                scores[:, n - min(2, n):] = float("-inf")  # the raw tail is never scored
                base = most_compressed_map(n, cfg, t).expand(2, n)
                maps = focus_maps(base, scores, cfg, t)
                assert is_legal(maps, K, 2, partial=partial).all() and (entry_counts(maps, K, t) <= W).all()
                assert (maps[base == RAW] == RAW).all()
                for v in range(2):
                    cand = (base[v] >= GIST) & (scores[v] > float("-inf"))
                    order = [b for b in scores[v].argsort(descending=True).tolist() if cand[b]]
                    free, want = W - int(entry_counts(base[v:v + 1], K, t)), []
                    for b in order:  # the prefix at the most compressed map's costs: shown at least
                        free -= K - 1 if base[v, b] == GIST else K
                        if free < 0:
                            break
                        want.append(b)
                    shown = ((maps[v] == RAW) & (base[v] >= GIST)).nonzero().view(-1).tolist()
                    assert shown == sorted(order[:len(shown)]) and len(shown) >= len(want)  # a prefix of the ranking
                    if len(shown) < len(order):  # and the next block does not fit the final map
                        nxt = order[len(shown)]
                        cost = K - 1 if maps[v, nxt] == GIST else K
                        assert int(entry_counts(maps[v:v + 1], K, t)) + cost > W
                    deep += any(base[v, b] >= GROUP and maps[v, b] == RAW and (maps[v] == base[v, b]).any() for b in shown)
    assert deep > 20  # blocks shown beside coarse gists happen


def test_read_on_ranks_each_block_right_behind_its_predecessor():
    inf = float("inf")
    scores = torch.tensor([[5.0, -2.0, 4.9, 1.0, -inf, 0.5, -inf],
                           [-inf, 3.0, 9.0, 2.0, 8.0, 0.0, 7.0]])
    s = read_on_scores(scores)
    assert scores[0, 2] < s[0, 1] < scores[0, 0] and s[0, 2] == scores[0, 2] and 1.0 < s[0, 3] < scores[0, 2]
    assert s[0, 5] == scores[0, 5] and s[0, 4] == -inf and s[0, 6] == -inf  # unscored blocks (the raw tail) stay so
    assert s[1, 0] == -inf and scores[1, 4] < s[1, 3] < scores[1, 2] and s[1, 2] == scores[1, 2]
    assert s[1, 4] == scores[1, 4] and s[1, 6] == scores[1, 6]  # the predecessor's own score is inherited, not a chain
    assert scores[1, 6] < s[1, 5] < scores[1, 4]
    assert s.argsort(1, descending=True)[0, :4].tolist() == [0, 1, 2, 3]
    # the focus: with room for two blocks, a needle's block and the one after it (off: the two best blocks)
    K = 4
    # 8 loose gists + 2 tail blocks = 16 entries; 2 x (K-1) more fit W = 22
    on = MCConfig(block_size=K, recent=2 * K, wc_budget=22, horizon=1)
    block_scores = torch.tensor([[0.0, 0.0, 6.0, 0.5, 0.0, 5.0, 0.0, 0.0, -inf, -inf]])
    base = torch.tensor([[GIST] * 8 + [RAW] * 2], dtype=torch.int8)
    assert (focus_maps(base, block_scores, on)[0] == RAW).nonzero().view(-1).tolist() == [2, 3, 8, 9]
    off = MCConfig(block_size=K, recent=2 * K, wc_budget=22, horizon=1, read_on=False)
    assert (focus_maps(base, block_scores, off)[0] == RAW).nonzero().view(-1).tolist() == [2, 5, 8, 9]
    # the last old block's successor is the raw tail: the budget goes to the next best block
    last = torch.tensor([[0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 6.0, -inf, -inf]])
    assert (focus_maps(base, last, on)[0] == RAW).nonzero().view(-1).tolist() == [0, 7, 8, 9]


def test_recency_bonus_shows_the_block_before_the_tail_unless_another_is_clearly_better():
    inf = float("inf")
    scores = torch.tensor([[1.0, 2.0, 0.5, -inf, -inf], [-inf, -inf, -inf, -inf, -inf], [0.0, 4.0, -inf, -1.0, -inf]])
    s = recency_scores(scores, 3.0)
    assert s[0].tolist() == [1.0, 2.0, 3.5, -inf, -inf]  # the most recent scored block, not the raw tail
    assert s[1].tolist() == [-inf] * 5  # nothing scored: nothing to favour
    assert s[2].tolist() == [0.0, 4.0, -inf, 2.0, -inf]  # a block the focus may not read stays so
    # the focus with room for one block: the recent block unless another beats it by more than the bonus
    K = 4
    n = 10  # 2 LOD2 groups + 8 tail tokens = 10 entries; a block beside its group costs K, opening the group 2 more: one fits W = 16
    cfg = MCConfig(block_size=K, recent=2 * K, wc_budget=16, horizon=1, recency_bonus=3.0)
    base = most_compressed_map(n, cfg)[None]
    close = torch.tensor([[0.0, 2.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -inf, -inf]])
    far = torch.tensor([[0.0, 3.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -inf, -inf]])
    shown = lambda c, b: (focus_maps(base, b, c)[0] == RAW).nonzero().view(-1).tolist()  # noqa: E731
    assert shown(cfg, close) == [7, 8, 9] and shown(cfg, far) == [1, 8, 9]
    assert shown(MCConfig(block_size=K, recent=2 * K, wc_budget=16, horizon=1, recency_bonus=0.0), close) == [1, 8, 9]


def test_similarity_scores_peak_at_a_gist_equal_to_the_tail_mean():
    K = 4
    cfg = MCConfig(block_size=K, recent=2 * K, wc_budget=40, horizon=1)
    n = 10
    levels, tokens = history(cfg, 1, n)
    tail_mean = levels[0][0, -cfg.recent:].mean(0)
    levels[1][0, 3] = 2.5 * tail_mean  # cosine is scale-free
    maps = torch.tensor([[GIST] * 8 + [RAW] * 2], dtype=torch.int8)
    wc = materialize(maps, levels, tokens, cfg)
    sim = similarity_scores(wc, cfg.recent)
    assert sim.shape == wc.valid.shape
    best = int(sim[0].argmax())
    assert wc.lod[0, best] == 1 and wc.pos[0, best] == 3 * K
    torch.testing.assert_close(sim[0, best], torch.tensor(1.0))
    assert (sim[~(wc.valid & (wc.lod > 0))] == 0).all()
    # greedy on similarity expands that block first
    new = edit_maps(maps, sim, wc, MCConfig(block_size=K, recent=2 * K, wc_budget=40, horizon=1, max_edits=1), "greedy")
    assert (new[0, :8] == RAW).nonzero().view(-1).tolist() == [3]


def test_expanded_units_marks_exactly_the_expanded_units():
    K = 4
    cfg = MCConfig(block_size=K, recent=K, wc_budget=1000, horizon=1, partial_gists=False)
    n = 3 * K + 3  # 3 groups, 2 loose gists, 1 tail block
    base = most_compressed_map(n, cfg).expand(3, n).clone()
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        want_groups = torch.rand(3, 3, generator=g) < 0.5
        m = expand_groups(base, want_groups, K)
        want_blocks = (torch.rand(3, n, generator=g) < 0.5) & (base == GIST)  # loose gists of the base
        inner = (torch.rand(3, n, generator=g) < 0.5) & (m == GIST) & (base == GROUP)  # blocks inside expanded groups
        m = expand_blocks(m, want_blocks | inner)
        blocks, groups = expanded_units(m, base, K)
        assert torch.equal(groups[:, :3], want_groups) and not groups[:, 3:].any(), "a group counts once however deep it is expanded"
        assert torch.equal(blocks, want_blocks), "blocks count only where the base map shows them as gists"
    blocks, groups = expanded_units(base, base, K)
    assert not blocks.any() and not groups.any()
