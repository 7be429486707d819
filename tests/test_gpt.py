"""The base GPT and its MegaContext hooks (DESIGN.md section 2)."""

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig, rotary_tables


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=64, vocab_size=97, n_layer=2, n_embd=128))
    m.init_weights()
    with torch.no_grad():  # output projections start at zero; perturb them so every layer matters
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m.eval()


def test_forward_backward_shapes(model):
    idx = torch.randint(0, 97, (3, 16))
    assert model(idx).shape == (3, 16, 97)
    loss = model(idx, idx)
    assert loss.ndim == 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    per_position = model(idx, idx, loss_reduction="none")
    assert per_position.shape == (3, 16)
    assert torch.allclose(per_position.mean(), loss, atol=1e-5)


def test_ignored_targets(model):
    idx = torch.randint(0, 97, (2, 12))
    targets = idx.clone()
    targets[:, :6] = -1
    per_position = model(idx, targets, loss_reduction="none")
    assert (per_position[:, :6] == 0).all() and (per_position[:, 6:] > 0).all()
    assert torch.allclose(model(idx, targets), per_position[:, 6:].mean(), atol=1e-5)


def test_kv_cache_matches_full_forward(model):
    idx = torch.randint(0, 97, (2, 20))
    full = model(idx)
    cache = model.new_kv_cache(2, 32)
    chunks = [model(idx[:, :9], kv_cache=cache), model(idx[:, 9:14], kv_cache=cache)]
    chunks += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(14, 20)]
    assert torch.allclose(torch.cat(chunks, 1), full, atol=1e-4)
    cache.truncate(9)  # reuse a prefix, recompute the rest
    assert torch.allclose(model(idx[:, 9:20], kv_cache=cache), full[:, 9:], atol=1e-4)


def test_inputs_embeds_equals_token_path(model):
    idx = torch.randint(0, 97, (2, 10))
    embeds = model.transformer.wte(idx)
    assert torch.allclose(model(inputs_embeds=embeds), model(idx), atol=1e-6)
    cache = model.new_kv_cache(2, 16)
    prefill = model(inputs_embeds=embeds, kv_cache=cache, rope=model.default_rope(10))
    assert torch.allclose(prefill, model(idx), atol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        model(idx, inputs_embeds=embeds)


def test_per_row_rope_override(model):
    B, T = 2, 10
    idx = torch.randint(0, 97, (B, T))
    cos, sin = rotary_tables(torch.arange(T).expand(B, T), model.config.head_dim)
    same = (cos[:, :, None, :], sin[:, :, None, :])
    assert torch.allclose(model(idx, rope=same), model(idx), atol=1e-5)
    shifted = torch.stack([torch.arange(T), torch.arange(T) * 3 + 100])  # row 1 at other positions
    cos, sin = rotary_tables(shifted, model.config.head_dim)
    out = model(idx, rope=(cos[:, :, None, :], sin[:, :, None, :]))
    assert torch.allclose(out[0], model(idx)[0], atol=1e-5)
    assert not torch.allclose(out[1], model(idx)[1], atol=1e-3)
    with pytest.raises(ValueError, match="rope tables"):
        model(idx, rope=(cos[:, :5, None, :], sin[:, :5, None, :]))


def test_flops_and_params(model):
    c = model.config
    assert model.num_params() == model.num_params(exclude_embedding=True) + c.vocab_size * c.n_embd
    assert model.estimate_flops() > 6 * model.num_params(exclude_embedding=True)


def test_bad_config():
    with pytest.raises(ValueError, match="head_dim"):
        GPT(GPTConfig(n_embd=96, head_dim=64))
    assert GPTConfig.from_depth(4).n_embd == 256 and GPTConfig.from_depth(4).n_head == 4
