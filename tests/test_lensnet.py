"""LensNet: shapes, zeros at padding, tail conditioning, non-causality, gradients everywhere."""

import copy

import torch

import mc.lensnet
from mc.config import MCConfig
from mc.lensnet import LensNet
from mc.working_context import tail_mask

D, W, TAIL = 48, 24, 4


def make(seed=0):
    torch.manual_seed(seed)
    net = LensNet(MCConfig(block_size=4, lens_width=32, lens_layers=2), D)
    with torch.no_grad():  # a "trained" net: the zero-initialised parts get values
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.2)
    return net


def batch(V=3, n_valid=(24, 17, 9), seed=1):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(V, W, D, generator=g)
    lod = torch.randint(0, 3, (V, W), generator=g)
    rel_pos = torch.rand(V, W, generator=g) * 5000
    valid = torch.arange(W)[None] < torch.tensor(n_valid)[:, None]  # right-padded
    return embeds, lod, rel_pos, valid


def test_initial_scores_are_zero():
    torch.manual_seed(0)
    net = LensNet(MCConfig(lens_width=32), D)
    scores = net(*batch(), tail_len=TAIL)
    assert scores.shape == (3, W) and scores.dtype == torch.float32 and scores.abs().max() == 0
    assert net.summary().endswith(f": {net.num_params():,} params") and "width 32" in net.summary()


def test_shape_and_zeros_at_invalid():
    net = make()
    embeds, lod, rel_pos, valid = batch()
    scores = net(embeds, lod, rel_pos, valid, tail_len=TAIL)
    assert scores.shape == (3, W) and scores.dtype == torch.float32
    assert (scores[~valid] == 0).all() and (scores[valid] != 0).all() and torch.isfinite(scores).all()
    embeds[~valid] = float("nan")  # padding content never leaks
    lod[~valid] = -1
    torch.testing.assert_close(net(embeds, lod, rel_pos, valid, tail_len=TAIL), scores)
    # a row computed alone (without padding) equals its padded version
    alone = net(embeds[2:, :9], lod[2:, :9], rel_pos[2:, :9], valid[2:, :9], tail_len=TAIL)
    torch.testing.assert_close(alone, scores[2:, :9], atol=1e-5, rtol=1e-5)
    # any V, W; an empty row; a per-row tail length
    out = net(torch.randn(1, 5, D), torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5), torch.ones(1, 5, dtype=torch.bool))
    assert out.shape == (1, 5)
    valid[1] = False
    out = net(embeds, lod, rel_pos, valid, tail_len=torch.tensor([2, 3, 4]))
    assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_tail_mask():
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    want = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(tail_mask(valid, 3), want)
    assert torch.equal(tail_mask(valid, torch.tensor([1, 1, 1]))[0], torch.tensor([0, 0, 0, 1, 0, 0], dtype=torch.bool))


def test_depends_on_tail():
    net = make()
    embeds, lod, rel_pos, valid = batch()
    scores = net(embeds, lod, rel_pos, valid, tail_len=TAIL)
    changed = embeds.clone()
    changed[0, W - 2] += 1.0  # a tail token of row 0 (24 valid entries, tail = 20..23)
    changed[1, 15] += 1.0  # a tail token of row 1 (17 valid, tail = 13..16)
    new = net(changed, lod, rel_pos, valid, tail_len=TAIL)
    assert (new[0, :10] - scores[0, :10]).abs().min() > 0, "every early entry must react to the tail"
    assert (new[1, :10] - scores[1, :10]).abs().min() > 0
    torch.testing.assert_close(new[2], scores[2])  # rows are independent
    # the tail length itself is part of the conditioning
    assert not torch.allclose(net(embeds, lod, rel_pos, valid, tail_len=2), scores)


def test_non_causal():
    net = make()
    embeds, lod, rel_pos, valid = batch()
    scores = net(embeds, lod, rel_pos, valid, tail_len=TAIL)
    changed = embeds.clone()
    changed[0, 12] += 1.0  # a later, non-tail entry
    new = net(changed, lod, rel_pos, valid, tail_len=TAIL)
    assert (new[0, :12] - scores[0, :12]).abs().min() > 0, "earlier entries must see later ones"
    # LOD and position also matter
    lod2 = lod.clone()
    lod2[0, 12] = (lod2[0, 12] + 1) % 3
    assert not torch.allclose(net(embeds, lod2, rel_pos, valid, tail_len=TAIL)[0, :12], scores[0, :12])
    assert not torch.allclose(net(embeds, lod, rel_pos * 2, valid, tail_len=TAIL), scores)


def test_gradients_reach_every_parameter():
    net = make()
    embeds, lod, rel_pos, valid = batch()
    scores = net(embeds, lod, rel_pos, valid, tail_len=TAIL)
    (scores * torch.randn_like(scores)).sum().backward()
    for name, p in net.named_parameters():
        if not name.startswith("match_"):  # the question match is its own call (`LensNet.match`, tested below)
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_bf16_module_scores_like_fp32():
    """A bf16 copy of the net returns fp32 scores close to the fp32 net's, and ranks the entries alike."""
    net = make()
    half = copy.deepcopy(net).to(torch.bfloat16)
    embeds, lod, rel_pos, valid = batch()
    want = net(embeds, lod, rel_pos, valid, tail_len=TAIL)
    scores = half(embeds, lod, rel_pos, valid, tail_len=TAIL)
    assert scores.dtype == torch.float32 and (scores[~valid] == 0).all()
    assert want[valid].std() > 0.1, "a net whose scores differ, so closeness means something"
    torch.testing.assert_close(scores, want, atol=0.05 * want[valid].abs().max().item(), rtol=0.05)
    best = want.masked_fill(~valid, -1e9).argmax(1)
    assert (scores.masked_fill(~valid, -1e9).argmax(1) == best).float().mean() >= 2 / 3


def test_question_match_scores_the_blocks_holding_question_tokens(monkeypatch):
    """The match of a block rises when it holds a token of the question (the last R tokens before focus_end),
    only that block's; it starts at 0, ignores tokens after focus_end, and chunking does not change it."""
    torch.manual_seed(0)
    net = LensNet(MCConfig(block_size=4, recent=8, lens_width=32, lens_match=True), D)
    lod0 = torch.randn(2, 42, D)  # 10 complete blocks + 2 tokens; the question: tokens 34..41
    assert net.match(lod0).shape == (2, 10) and net.match(lod0).abs().max() == 0, "no effect before training"
    with torch.no_grad():
        net.match_scale.fill_(1.0)
    base = net.match(lod0)
    assert base[:, 9].abs().max() == 0, "block 9 (tokens 36..39) lies in the question: its tokens do not match themselves"
    planted = lod0.clone()
    planted[0, 9] = lod0[0, 37]  # block 2 of row 0 now holds a question token
    changed = net.match(planted) - base
    assert changed[0, 2] > 0.3, "an exact match counts softplus(0) = 0.69 at the start"
    changed[0, 2] = 0
    assert changed.abs().max() == 0, "no other block and no other row moves"
    end = torch.tensor([24, 42])  # row 0 decides its focus after 24 tokens
    later = lod0.clone()
    later[0, 24:] = torch.randn(18, D)
    torch.testing.assert_close(net.match(later, end)[0, :6], net.match(lod0, end)[0, :6])  # the blocks before it
    assert torch.isfinite(net.match(lod0, torch.tensor([3, 5]))).all(), "a question that starts before the history"
    monkeypatch.setattr(mc.lensnet, "MATCH_CHUNK", 3)
    torch.testing.assert_close(net.match(lod0), base)
    (net.match(planted) * torch.randn(2, 10)).sum().backward()
    for name, p in net.named_parameters():
        if name.startswith("match_"):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
