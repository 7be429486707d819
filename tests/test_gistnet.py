"""GistNet: shapes, levels, key padding, pooling, initial gist = block mean, gradients everywhere."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from mc.config import MCConfig
from mc.gistnet import GistNet
from nanochat.gpt import norm

D, K = 64, 8


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return GistNet(MCConfig(block_size=K, **kw), D)


def randomize_outputs(net, std=0.5):
    """Give the zero-initialised output projections random values so every path is visible."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 2 and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std / p.size(1) ** 0.5)
    return net


def test_shape_dtype_and_level_embedding():
    net = randomize_outputs(make())
    x = torch.randn(5, K, D)
    g1, g2 = net(x, level=1), net(x, level=2)
    assert g1.shape == (5, D) and g1.dtype == x.dtype
    assert not torch.allclose(g1, g2, atol=1e-4), "the level embedding must change the gist"
    mixed = net(x, level=torch.tensor([1, 2, 1, 2, 2]))  # a per-block level tensor
    torch.testing.assert_close(mixed[0], g1[0])
    torch.testing.assert_close(mixed[1], g2[1])


def test_query_pooling_is_attention_over_projected_values():
    """attend_pool applies pool_v once per gist, to the attention-weighted tokens: the same pooling (and gradient) as
    attention over every token's projected value, with two heads and padded keys."""
    torch.manual_seed(0)
    width, heads = 128, 2
    net = randomize_outputs(GistNet(MCConfig(block_size=K), width))
    x = torch.randn(4, K, width)
    mask = (torch.arange(K)[None] < torch.tensor([K, 5, 1, 3])[:, None])[:, None, None, :]
    h = norm(x)
    split = lambda t: t.view(4, K, heads, width // heads).transpose(1, 2)  # noqa: E731
    q = norm(net.query.view(1, heads, 1, width // heads)).expand(4, heads, 1, width // heads)
    reference = F.scaled_dot_product_attention(q, norm(split(net.pool_k(h))), split(net.pool_v(h)), attn_mask=mask)
    reference = reference.reshape(4, width)
    pooled = net.attend_pool(x, mask)
    torch.testing.assert_close(pooled, reference)
    grad_ref = torch.autograd.grad(reference.square().sum(), net.pool_v.weight)[0]
    torch.testing.assert_close(torch.autograd.grad(pooled.square().sum(), net.pool_v.weight)[0], grad_ref)


def test_mlp_ratio_sets_the_hidden_width():
    net = make(gist_mlp_ratio=2)
    assert net.blocks[0].c_fc.weight.shape == (2 * D, D) and net.blocks[0].mlp_proj.weight.shape == (D, 2 * D)
    assert net(torch.randn(3, K, D)).shape == (3, D)


@pytest.mark.parametrize("pooling", ["mean", "query", "cls"])
def test_padded_keys_do_not_matter(pooling):
    net = randomize_outputs(make(gist_pooling=pooling))
    x = torch.randn(4, K, D)
    n_real = torch.tensor([K, 5, 1, 3])
    mask = torch.arange(K)[None] < n_real[:, None]  # [4, K], right-padded
    mask[3] = torch.tensor([True, False, True, False, True, False, False, False])  # holes work too
    out = net(x, mask=mask)
    y = torch.where(mask[..., None], x, torch.randn_like(x) * 100)
    torch.testing.assert_close(net(y, mask=mask), out)
    y[~mask] = float("nan")
    torch.testing.assert_close(net(y, mask=mask), out)
    # a right-padded block equals its unpadded prefix
    torch.testing.assert_close(net(x[1:2, :5]), out[1:2], atol=1e-5, rtol=1e-5)
    empty = net(x[:1], mask=torch.zeros(1, K, dtype=torch.bool))
    assert torch.isfinite(empty).all() and empty.abs().max() == 0


def test_cls_pooling_depends_on_block():
    net = randomize_outputs(make(gist_pooling="cls", gist_head="linear"))
    x = torch.randn(2, K, D)
    # the residual mean is the same for a permuted block: any change comes from the CLS path
    perm = x[:, torch.randperm(K)]
    assert not torch.allclose(net(x), net(perm), atol=1e-4)
    # and the CLS pool itself changes with the content
    y = x.clone()
    y[:, 2] += 1.0
    assert not torch.allclose(net(x) - x.mean(1), net(y) - y.mean(1), atol=1e-4)


@pytest.mark.parametrize("gist_type", ["transformer", "mean"])
def test_untrained_gist_is_block_mean(gist_type):
    net = make(gist_type=gist_type)
    x = torch.randn(6, K, D)
    torch.testing.assert_close(net(x, level=1), x.mean(1))
    torch.testing.assert_close(net(x, level=2), x.mean(1))
    mask = torch.arange(K)[None] < torch.tensor([K, 3, 1, 2, 5, 7])[:, None]
    want = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(net(x, mask=mask), want)


COMBOS = list(itertools.product(["transformer", "mean"], ["mean", "query", "cls"], ["linear", "mlp"]))


@pytest.mark.parametrize("gist_type,pooling,head", COMBOS)
def test_every_combination_trains(gist_type, pooling, head):
    net = randomize_outputs(make(gist_type=gist_type, gist_pooling=pooling, gist_head=head, gist_layers=1))
    x = torch.randn(3, K, D, requires_grad=True)
    mask = torch.ones(3, K, dtype=torch.bool)
    mask[1, 6:] = False
    out = net(x, level=torch.tensor([1, 2, 1]), mask=mask)
    (out.square().sum() + net(x, level=2).sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert net.num_params() == sum(p.numel() for p in net.parameters())
    assert net.summary().endswith(f": {net.num_params():,} params") and f"K={K}" in net.summary()


def test_module_dtype_is_internal():
    net = make().to(torch.bfloat16)
    x = torch.randn(2, K, D)
    out = net(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.mean(1), atol=2e-2, rtol=2e-2)
