"""The MegaContext tree: batched build, streaming append == build, capacity growth."""

import pytest
import torch
import torch.nn as nn

from mc.config import MCConfig
from mc.gistnet import GistNet
from mc.tree import MCTree, build_tree

D, V = 32, 50


def setup(K=4, max_lod=2, cache_lod0=True, seed=0):
    torch.manual_seed(seed)
    cfg = MCConfig(block_size=K, max_lod=max_lod, cache_lod0=cache_lod0, gist_layers=1)
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
    assert [t.shape[1] for t in short] == [3, 0, 0]
    assert len(build_tree(embeds, gistnet, MCConfig(block_size=4, max_lod=1))) == 2


def test_build_tree_gradients_reach_embeddings_and_gistnet():
    cfg, gistnet, emb = setup(K=4)
    ids = torch.randint(0, V, (2, 64))
    levels = build_tree(emb(ids), gistnet, cfg)
    levels[2].square().sum().backward()  # a loss on LOD2 gists only
    assert emb.weight.grad is not None and emb.weight.grad[ids.unique()].abs().sum(-1).gt(0).all()
    for name, p in gistnet.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


@pytest.mark.parametrize("cache_lod0", [True, False])
@pytest.mark.parametrize("K", [4, 8])
def test_streaming_equals_build(K, cache_lod0):
    cfg, gistnet, emb = setup(K=K, cache_lod0=cache_lod0)
    B, T = 2, 3 * K * K + 2 * K + 3
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


def test_append_validates_input():
    cfg, gistnet, emb = setup()
    tree = MCTree(cfg, emb, gistnet, batch_size=2)
    with pytest.raises(ValueError, match=r"\[2, n\]"):
        tree.append(torch.zeros(3, 5, dtype=torch.long))
    tree.append(torch.zeros(2, 0, dtype=torch.long))
    assert tree.num_tokens == 0


