"""The base GPT and its MegaContext hooks (docs/architecture.md §2)."""

from dataclasses import asdict

import pytest
import torch

from nanochat.checkpoint import build_model, save_checkpoint
from nanochat.gpt import GPT, SMEAR_MODES, GPTConfig, rotary_tables


def perturbed_model(smear: str = "both", taps: int = 1, **config):
    torch.manual_seed(0)
    m = GPT(GPTConfig(**{**dict(sequence_len=64, vocab_size=97, n_layer=2, n_embd=128, smear=smear, smear_taps=taps), **config}))
    m.init_weights()
    with torch.no_grad():  # output projections start at zero; perturb them so every layer matters
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for name, p in m.named_parameters():  # mixing and layer scalars at a clearly non-trivial strength
            if any(key in name for key in ("smear", "share", "resid_scale", "value_")):
                p.add_(0.5 + torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return perturbed_model()


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


@pytest.mark.parametrize("config", [{}, dict(window_pattern="SL", sequence_len=8), dict(layer_scalars=True, backout=True),
                                    dict(n_kv_head=1, smear="embed", n_layer=1)])
def test_logits_to_keep_gives_the_last_positions_only(config):
    """Prefill and evaluation ask for the last n logits, and the last block then computes those positions alone:
    the same values as a full forward's last n, also after a cached prefix and for the token decoded after a
    trimmed prefill (the cache still holds every key and value); with targets it is an error."""
    model = perturbed_model(**config)
    idx = torch.randint(0, 97, (2, 14))
    full = model(idx)
    for n in (1, 3, 14, 20):
        assert torch.allclose(model(idx, logits_to_keep=n), full[:, -n:], atol=1e-5)
    cache = model.new_kv_cache(2, 16)
    assert torch.allclose(model(idx[:, :6], kv_cache=cache, logits_to_keep=2), full[:, 4:6], atol=1e-4)
    assert torch.allclose(model(idx[:, 6:13], kv_cache=cache, logits_to_keep=3), full[:, 10:13], atol=1e-4)
    assert torch.allclose(model(idx[:, 13:], kv_cache=cache, logits_to_keep=1), full[:, -1:], atol=1e-4)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(idx, idx, logits_to_keep=1)


def test_ignored_targets(model):
    idx = torch.randint(0, 97, (2, 12))
    targets = idx.clone()
    targets[:, :6] = -1
    per_position = model(idx, targets, loss_reduction="none")
    assert (per_position[:, :6] == 0).all() and (per_position[:, 6:] > 0).all()
    assert torch.allclose(model(idx, targets), per_position[:, 6:].mean(), atol=1e-5)


@pytest.mark.parametrize("smear,taps,config", [(mode, 1, {}) for mode in SMEAR_MODES] + [("both", 3, {})] +
                         [("both", 1, dict(layer_scalars=True, backout=True)),
                          ("both", 3, dict(window_pattern="SL", sequence_len=16)),
                          ("both", 1, dict(value_embeds=True, n_layer=3))])
def test_kv_cache_matches_full_forward(smear, taps, config):
    """Prefill, chunk after a cached prefix, single-token decode and a truncated cache all equal one full
    forward, with every kind of previous-token mixing (the predecessor of a chunk's first position comes
    from the cache) and with the layer scalars and backout."""
    model = perturbed_model(smear, taps, **config)
    idx = torch.randint(0, 97, (2, 20))
    full = model(idx)
    cache = model.new_kv_cache(2, 32)
    chunks = [model(idx[:, :9], kv_cache=cache), model(idx[:, 9:14], kv_cache=cache)]
    chunks += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(14, 20)]
    assert torch.allclose(torch.cat(chunks, 1), full, atol=1e-4)
    cache.truncate(9)  # reuse a prefix, recompute the rest
    assert torch.allclose(model(idx[:, 9:20], kv_cache=cache), full[:, 9:], atol=1e-4)
    cache.truncate(1)
    assert torch.allclose(model(idx[:, 1:20], kv_cache=cache), full[:, 1:], atol=1e-4)


def test_previous_token_mixing_is_causal_and_active():
    """Mixing reads only earlier positions, and it changes what a position sees (the parameters are live)."""
    model = perturbed_model("both")
    idx = torch.randint(0, 97, (1, 12))
    changed = idx.clone()
    changed[0, 6] = (idx[0, 6] + 1) % 97
    a, b = model(idx), model(changed)
    assert torch.allclose(a[0, :6], b[0, :6], atol=1e-6) and not torch.allclose(a[0, 7], b[0, 7], atol=1e-4)
    plain = perturbed_model("none")
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "smear" not in k})
    assert not torch.allclose(plain(idx)[0, 1:], a[0, 1:], atol=1e-3)
    loss = model(idx, idx)
    loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "smear" in name]
    assert len(grads) == model.config.n_layer + 2 and all(g is not None and g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_inputs_embeds_equals_token_path(model):
    idx = torch.randint(0, 97, (2, 10))
    embeds = model.transformer.wte(idx)
    assert torch.allclose(model(inputs_embeds=embeds, token_ids=idx), model(idx), atol=1e-6)
    cache = model.new_kv_cache(2, 16)
    prefill = model(inputs_embeds=embeds, token_ids=idx, kv_cache=cache, rope=model.default_rope(10))
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
    tables = 1 + len(model.value_embeds)  # token embedding + value embeddings (kv_dim = n_embd here)
    assert model.num_params() == model.num_params(exclude_embedding=True) + tables * c.padded_vocab * c.n_embd
    assert model.estimate_flops() > 6 * model.num_params(exclude_embedding=True)


def test_bad_config():
    with pytest.raises(ValueError, match="head_dim"):
        GPT(GPTConfig(n_embd=96, head_dim=64))
    with pytest.raises(ValueError, match="smear"):
        GPT(GPTConfig(smear="sometimes"))
    assert GPTConfig.from_depth(4).n_embd == 256 and GPTConfig.from_depth(4).n_head == 4


def test_padded_vocab_is_cropped_and_never_predicted():
    """The 97-token vocabulary is stored as 128 rows; logits, losses and samples see only the 97 real tokens, and
    an unpadded model with the same real rows gives the same logits."""
    padded = perturbed_model()
    assert padded.lm_head.weight.shape[0] == 128 and padded.transformer.wte.weight.shape[0] == 128
    with torch.no_grad():
        padded.lm_head.weight[97:] = 100.0  # padding rows that would win every argmax if they leaked
    idx = torch.randint(0, 97, (2, 12))
    logits = padded(idx)
    assert logits.shape == (2, 12, 97) and logits.argmax(-1).max() < 97
    exact = GPT(GPTConfig(**{**padded.config.__dict__, "vocab_multiple": 1})).eval()
    tables = ("transformer.wte.weight", "lm_head.weight", *(f"value_embeds.{i}.weight" for i in padded.value_embeds))
    state = {k: v[:97] if k in tables else v for k, v in padded.state_dict().items()}
    exact.load_state_dict(state)
    assert torch.allclose(exact(idx), logits, atol=1e-5)


def test_layer_scalars_and_backout_start_neutral_and_learn():
    """At init the layer scalars and backout leave the function unchanged (same seed, same outputs as without
    them); all three get gradients, so training can move them."""
    torch.manual_seed(0)
    plain = GPT(GPTConfig(sequence_len=64, vocab_size=97, n_layer=2, n_embd=128))
    plain.init_weights()
    torch.manual_seed(0)
    extra = GPT(GPTConfig(sequence_len=64, vocab_size=97, n_layer=2, n_embd=128, layer_scalars=True, backout=True))
    extra.init_weights()
    with torch.no_grad():
        for block in (*plain.transformer.h, *extra.transformer.h):  # non-zero outputs, the same in both
            torch.manual_seed(1)
            block.attn.c_proj.weight.normal_(std=0.1)
            block.mlp.c_proj.weight.normal_(std=0.1)
    idx = torch.randint(0, 97, (2, 16))
    assert torch.allclose(plain(idx), extra(idx), atol=1e-6)
    extra(idx, idx).backward()
    for p in (extra.resid_scale, extra.x0_share, extra.backout_share):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_checkpoints_from_before_vocab_padding_load(tmp_path):
    """A checkpoint written before vocab_multiple existed (unpadded tables, no field in its config) loads as it was
    trained and predicts the same."""
    old = GPT(GPTConfig(sequence_len=64, vocab_size=97, n_layer=1, n_embd=64, vocab_multiple=1, value_embeds=False))
    old.init_weights()
    config = asdict(old.config)
    del config["vocab_multiple"], config["layer_scalars"], config["backout"], config["value_embeds"]
    save_checkpoint(tmp_path, 1, {"gpt": old}, None, {"model_config": config, "step": 1})
    model, _, _ = build_model(tmp_path, 1, "cpu")
    idx = torch.randint(0, 97, (1, 8))
    assert model.config.vocab_multiple == 1 and not model.config.value_embeds and torch.allclose(model(idx), old(idx))


def test_short_window_layers_see_only_the_last_half_context():
    """window_pattern S: a layer's query at t sees positions (t - sequence_len/2, t]; the last layer always sees all."""
    config = GPTConfig(sequence_len=16, vocab_size=97, n_layer=3, n_embd=128, smear="none", window_pattern="S",
                       value_embeds=False)
    assert config.windows == [8, 8, None]
    torch.manual_seed(0)
    attn = GPT(config).transformer.h[0].attn
    cos, sin = GPT(config).default_rope(20)
    x = torch.randn(1, 20, 128)
    changed = x.clone()
    changed[:, 0] += 1.0
    with torch.no_grad():
        delta = (attn(x, cos, sin) - attn(changed, cos, sin)).abs().amax(-1)[0]  # [20]
    assert (delta[:8] > 0).all() and (delta[8:] == 0).all()
    with pytest.raises(ValueError, match="window_pattern"):
        GPTConfig(window_pattern="SX").validate()


def test_value_embeds_need_token_ids_and_skip_non_tokens():
    """Value embeddings (layers 0 and 2 of 3) read the token ids: the inputs_embeds path with token_ids equals the
    token path; without token_ids it is an error; entries marked -1 (gists) get no value embedding."""
    model = perturbed_model(value_embeds=True, n_layer=3)
    assert sorted(model.value_embeds) == ["0", "2"]
    idx = torch.randint(0, 97, (2, 10))
    embeds = model.transformer.wte(idx)
    assert torch.allclose(model(inputs_embeds=embeds, token_ids=idx), model(idx), atol=1e-5)
    with pytest.raises(ValueError, match="value embeddings: inputs_embeds need token_ids"):
        model(inputs_embeds=embeds)
    none = model(inputs_embeds=embeds, token_ids=torch.full_like(idx, -1))
    assert not torch.allclose(none, model(idx), atol=1e-3)
    with torch.no_grad():  # entries that are no token behave as if every value embedding were zero
        for table in model.value_embeds.values():
            table.weight.zero_()
    assert torch.allclose(none, model(idx), atol=1e-5)


def test_kept_forward_share_counts_the_trimmed_last_block_and_head():
    """MFU of passes that read only the last logits: all of a forward at keep >= n, less the last block's queries,
    output and MLP and the head's share for fewer kept positions (keys and values still cover every position)."""
    m = GPT(GPTConfig(sequence_len=64, vocab_size=512, n_layer=4, n_embd=64))
    assert m.kept_forward_share(128, 128) == m.kept_forward_share(128, 500) == 1
    shares = [m.kept_forward_share(128, keep) for keep in (1, 16, 64)]
    assert 0 < shares[0] < shares[1] < shares[2] < 1
    last, head = m.transformer.h[-1], m.lm_head.weight.numel()
    kv = last.attn.c_k.weight.numel() + last.attn.c_v.weight.numel()
    others = sum(p.numel() for p in m.transformer.h[:-1].parameters())
    full = others + sum(p.numel() for p in last.parameters()) + head
    assert shares[0] == pytest.approx((others + kv + (full - others - kv) / 128) / full)
