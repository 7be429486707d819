"""The MegaContext tree: batched build, streaming append == build (deep trees, partial gists), capacity growth."""

import dataclasses

import pytest
import torch
import torch.nn as nn

from mc.config import MCConfig
from mc.gistnet import GistNet
from mc.tree import MCTree, build_tree, level_rows, partial_nodes, tree_depth

D, V = 32, 50


def setup(K=4, max_lod=2, cache_lod0=True, seed=0, partial_gists=False, recent=None):
    torch.manual_seed(seed)
    cfg = MCConfig(block_size=K, max_lod=max_lod, cache_lod0=cache_lod0, gist_layers=1, partial_gists=partial_gists,
                   recent=recent or 2 * K)
    gistnet = GistNet(cfg, D)
    with torch.no_grad():  # a "trained" net: non-zero outputs, so gists differ from block means
        for p in gistnet.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.1)
    embedding = nn.Embedding(V, D)
    return cfg, gistnet, embedding


def test_build_tree_shapes():
    cfg, gistnet, _ = setup(K=4)
    embeds = torch.randn(2, 4 * 4 * 3 + 6, D)  # 3 complete LOD2 groups, 2 more blocks, 2 tokens
    lod0, lod1, lod2 = build_tree(embeds, gistnet, cfg)
    assert lod0 is embeds
    assert lod1.shape == (2, 13, D) and lod2.shape == (2, 3, D)
    torch.testing.assert_close(lod1[1, 5], gistnet(embeds[1:2, 20:24], level=1)[0])
    torch.testing.assert_close(lod2[0, 2], gistnet(lod1[0:1, 8:12], level=2)[0])
    short = build_tree(torch.randn(1, 3, D), gistnet, cfg)  # no complete block
    assert [t.shape[1] for t in short] == [3, 0]
    deep = build_tree(torch.randn(1, 4 ** 4 * 2 + 5, D), gistnet, cfg)  # as deep as the history needs: LOD4
    assert [t.shape[1] for t in deep] == [4 ** 4 * 2 + 5, 129, 32, 8, 2]
    torch.testing.assert_close(deep[4][0, 1], gistnet(deep[3][:, 4:8], level=4)[0])  # level 4 shares LOD2's embedding
    torch.testing.assert_close(gistnet(deep[3][:, 4:8], level=4), gistnet(deep[3][:, 4:8], level=2))


def test_partial_gists_cover_the_complete_children_before_the_tail():
    """K=4, R=8 (2 blocks): 45 blocks -> 43 older = 2·16 + 2·4 + 3: a LOD2 partial of 3 blocks, a LOD3 partial of
    2 LOD2 nodes and a LOD4 partial of 2 LOD3 nodes, one GistNet call over the complete children, the rest masked."""
    cfg, gistnet, _ = setup(K=4, partial_gists=True)
    embeds = torch.randn(2, 45 * 4 + 3, D)
    assert partial_nodes(45, cfg) == [(2, 10, 3), (3, 2, 2), (4, 0, 2)]  # blocks 40-42; blocks 32-39; blocks 0-31
    levels = build_tree(embeds, gistnet, cfg)
    assert [t.shape[1] for t in levels] == [183, 45, 11, 3, 1] and level_rows(45, 3, cfg) == 3
    torch.testing.assert_close(levels[2][:, 10], gistnet(levels[1][:, 40:43], level=2))
    torch.testing.assert_close(levels[4][:, 0], gistnet(levels[3][:, 0:2], level=4))
    full = build_tree(embeds, gistnet, dataclasses.replace(cfg, partial_gists=False))
    torch.testing.assert_close(levels[2][:, :10], full[2][:, :10])  # complete nodes are unchanged
    embeds = torch.randn(2, 48 * 4, D)  # 48 blocks, 46 older: LOD3 partial of LOD2 nodes 8, 9, 10
    lod3, full = build_tree(embeds, gistnet, cfg), build_tree(embeds, gistnet, dataclasses.replace(cfg, partial_gists=False))
    assert (3, 2, 3) in partial_nodes(48, cfg) and lod3[3].shape[1] == 3 and full[3].shape[1] == 3
    # the partial gist does not depend on what sits in its masked slots (here LOD2 node 11, past the boundary)
    mask = torch.tensor([True, True, True, False]).expand(2, 4)
    torch.testing.assert_close(lod3[3][:, 2], gistnet(full[2][:, 8:12], level=3, mask=mask))
    noise = torch.cat([full[2][:, 8:11], torch.randn(2, 1, D) * 100], 1)
    torch.testing.assert_close(lod3[3][:, 2], gistnet(noise, level=3, mask=mask))
    assert not torch.allclose(lod3[3][:, 2], full[3][:, 2])  # and it is not the complete node's gist
    assert tree_depth(48, cfg) == 4 and tree_depth(3, cfg) == 1


def test_build_tree_gradients_reach_embeddings_and_gistnet():
    cfg, gistnet, emb = setup(K=4)
    ids = torch.randint(0, V, (2, 64))
    levels = build_tree(emb(ids), gistnet, cfg)
    levels[2].square().sum().backward()  # a loss on LOD2 gists only
    assert emb.weight.grad is not None and emb.weight.grad[ids.unique()].abs().sum(-1).gt(0).all()
    for name, p in gistnet.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


@pytest.mark.parametrize("partial_gists", [False, True])
@pytest.mark.parametrize("cache_lod0", [True, False])
@pytest.mark.parametrize("K", [4, 8])
def test_streaming_equals_build(K, cache_lod0, partial_gists):
    cfg, gistnet, emb = setup(K=K, cache_lod0=cache_lod0, partial_gists=partial_gists)
    B, T = 2, K ** 3 + 3 * K * K + 2 * K + 3  # LOD3 nodes (and a partial one)
    ids = torch.randint(0, V, (B, T))
    tree = MCTree(cfg, emb, gistnet, batch_size=B, capacity=5)  # tiny: many capacity doublings
    chunks, t, i = [1, 3, K, 2 * K + 5, 1, K * K + 1, 7], 0, 0
    while t < T:
        n = min(chunks[i % len(chunks)], T - t)
        tree.append(ids[:, t:t + n])
        t, i = t + n, i + 1
        assert tree.num_tokens == t
    assert (tree.lod0_cache is None) == (not cache_lod0)
    with torch.no_grad():
        want = build_tree(emb(ids), gistnet, cfg)
    got = tree.levels()
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert torch.equal(tree.token_ids, ids)


def test_each_gist_computed_once():
    cfg, gistnet, emb = setup(K=4)
    calls = []
    gistnet.register_forward_hook(lambda m, args, kw_out=None: calls.append(args[0].shape[0]))
    tree = MCTree(cfg, emb, gistnet)
    for _ in range(4 * 4 * 2 + 3):  # token by token, B = 1, 1-D ids
        tree.append(torch.randint(0, V, (1,)))
    assert sum(calls) == 8 + 2 and len(calls) == 10  # 8 LOD1 blocks + 2 LOD2 groups, each once
    assert all(not g.requires_grad for g in tree.levels())  # inference: no autograd graph kept


def test_partial_gists_are_recomputed_only_when_their_children_change():
    cfg, gistnet, emb = setup(K=4, partial_gists=True)
    calls = []
    gistnet.register_forward_hook(lambda m, args, kw_out=None: calls.append(args[0].shape[0]))
    tree = MCTree(cfg, emb, gistnet)
    tree.append(torch.randint(0, V, (4 * 14,)))  # 14 blocks, 12 older = 3 complete LOD2 nodes, no partial LOD2
    assert tree.partial[0] == [(3, 0, 3)] and len(calls) == 3  # LOD1, LOD2, then the partial LOD3 of 3 LOD2 nodes
    for _ in range(3):  # inside the partial block: nothing to recompute
        tree.append(torch.randint(0, V, (1,)))
    assert len(calls) == 3
    tree.append(torch.randint(0, V, (1,)))  # block 15 completes: block 12 passes the boundary, alone (no partial LOD2)
    assert tree.partial[0] == [(3, 0, 3)] and len(calls) == 4
    tree.append(torch.randint(0, V, (4,)))  # block 13 passes too: LOD2 partial of blocks 12, 13
    assert tree.partial[0] == [(2, 3, 2), (3, 0, 3)] and len(calls) == 8  # + LOD1, LOD2 and LOD3 complete, 1 partial


def test_append_validates_input():
    cfg, gistnet, emb = setup()
    tree = MCTree(cfg, emb, gistnet, batch_size=2)
    with pytest.raises(ValueError, match=r"\[2, n\]"):
        tree.append(torch.zeros(3, 5, dtype=torch.long))
    tree.append(torch.zeros(2, 0, dtype=torch.long))
    assert tree.num_tokens == 0


