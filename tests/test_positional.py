"""Rotary positions of working-context entries (docs/architecture.md §6)."""

import pytest
import torch

from mc.config import MCConfig
from mc.positional import compress_far, rope_frame, wc_rope
from mc.working_context import entry_token_ids, materialize
from nanochat.gpt import GPT, GPTConfig, rotary_frequencies, rotary_tables

HD = 64


def entries(pos, span):
    """pos/span lists -> [1, W] tensors, lod from the span (K = 4), all valid."""
    pos, span = torch.tensor([pos]), torch.tensor([span])
    lod = torch.where(span == 1, 0, torch.where(span == 4, 1, 2))
    return pos, span, lod, torch.ones_like(pos, dtype=torch.bool)


def test_gaussian_equals_standard_rope_for_tokens():
    pos = torch.randint(0, 100_000, (3, 50))
    span = torch.ones_like(pos)
    cos, sin = wc_rope(pos, span, torch.zeros_like(pos), torch.ones_like(pos, dtype=torch.bool), HD, "gaussian")
    ref_cos, ref_sin = rotary_tables(pos, HD)
    assert cos.shape == (3, 50, 1, HD // 2) and cos.dtype == torch.float32
    assert torch.equal(cos[:, :, 0], ref_cos) and torch.equal(sin[:, :, 0], ref_sin)


def test_gaussian_damps_more_at_higher_lod():
    pos, span, lod, valid = entries([512, 496, 0], [1, 32, 1024])  # three entries with the same centre region
    cos, sin = wc_rope(pos, span, lod, valid, HD, "gaussian")
    power = (cos.square() + sin.square())[0, :, 0]  # [3, hd/2]
    assert torch.allclose(power[0], torch.ones(HD // 2))
    assert (power[1] <= power[0]).all() and (power[2] <= power[1]).all()
    assert power[1].sum() < power[0].sum() and power[2].sum() < power[1].sum()
    assert power[2, 0] < 1e-6 and power[2, -1] > 0.9  # the fastest frequency vanishes, the slowest survives


def test_gaussian_is_the_expected_rotation_over_the_span():
    K = 32
    for lod, span in ((1, K), (2, K * K)):
        start = 3 * span
        pos, sp, lo, valid = entries([start], [span])
        cos, sin = wc_rope(pos, sp, lo, valid, HD, "gaussian")
        omega = rotary_frequencies(HD)
        angles = torch.arange(start, start + span, dtype=torch.float64)[:, None] * omega.double()
        mean_cos, mean_sin = angles.cos().mean(0), angles.sin().mean(0)  # exact average over the span
        slow = omega * span < 1.0  # where the Gaussian approximation of the uniform is tight
        assert slow.sum() > 3
        assert torch.allclose(cos[0, 0, 0][slow].double(), mean_cos[slow], atol=5e-3)
        assert torch.allclose(sin[0, 0, 0][slow].double(), mean_sin[slow], atol=5e-3)


def test_index_mode_numbers_entries():
    pos, span, lod, valid = entries([0, 1024, 1056, 1057], [1024, 32, 1, 1])
    cos, sin = wc_rope(pos.expand(2, 4), span.expand(2, 4), lod.expand(2, 4), valid.expand(2, 4), HD, "index")
    ref_cos, ref_sin = rotary_tables(torch.arange(4), HD)
    assert torch.equal(cos[0, :, 0], ref_cos) and torch.equal(sin[1, :, 0], ref_sin)


def test_per_row_tables_and_padding():
    pos = torch.tensor([[0, 4, 8, 0], [64, 68, 72, 76]])
    span = torch.tensor([[4, 4, 1, 1], [4, 4, 4, 1]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    cos, sin = wc_rope(pos, span, (span > 1).long(), valid, HD, "gaussian")
    assert not torch.allclose(cos[0, :3], cos[1, :3])
    assert (cos[0, 3] == 1).all() and (sin[0, 3] == 0).all()  # padding: identity rotation


def test_frame_moves_in_steps_of_an_eighth():
    assert [rope_frame(t, 1024) for t in (0, 127, 128, 1023, 1024, 1151, 1152)] == [127, 127, 255, 1023, 1151, 1151, 1279]
    assert torch.equal(rope_frame(torch.tensor([5, 1100]), 1024), torch.tensor([127, 1151]))


def test_histories_within_the_training_length_are_unchanged():
    pos = torch.tensor([[0, 512, 992, 1000, 1023]])
    span, lod = torch.tensor([[512, 32, 1, 1, 1]]), torch.tensor([[2, 1, 0, 0, 0]])
    valid = torch.ones_like(pos, dtype=torch.bool)
    plain, framed = wc_rope(pos, span, lod, valid, HD, "gaussian"), wc_rope(pos, span, lod, valid, HD, "gaussian", max_len=1024)
    assert torch.equal(plain[0], framed[0]) and torch.equal(plain[1], framed[1])


def test_far_positions_are_compressed_into_the_training_length():
    max_len, L = 1024, 20_000
    centre = torch.cat([torch.arange(0, L - 64, 97), torch.arange(L - 64, L)]).float()[None]  # [1, n]
    frame = rope_frame(torch.tensor([L - 1]), max_len)
    var = torch.full_like(centre, 10.0)
    new, new_var = compress_far(centre, var, frame, max_len)
    assert float(frame[0] - new.min()) <= max_len - 1  # nothing max_len or more from the frame
    assert (new.diff() > 0).all()  # order kept
    near = centre >= frame[0] - max_len // 2 + 1
    assert torch.equal(new[near], centre[near]) and torch.equal(new_var[near], var[near])  # the near half exact
    assert (new_var[~near] < var[~near]).all()  # far spans shrink with their spacing
    cos, _ = wc_rope(torch.tensor([[0, L - 1]]), torch.tensor([[1, 1]]), torch.zeros(1, 2, dtype=torch.long),
                     torch.ones(1, 2, dtype=torch.bool), HD, "gaussian", max_len=max_len)
    assert torch.equal(cos[0, 1, 0], rotary_tables(torch.tensor([L - 1]), HD)[0][0])  # the newest token: standard RoPE


def test_rejects_bad_modes():
    args = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long)
    rest = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown positional mode"):
        wc_rope(*args, *rest, HD, "alibi")
    with pytest.raises(ValueError, match="width"):
        wc_rope(*args, *rest, HD, "2d")
    with pytest.raises(ValueError, match="even head dim"):
        wc_rope(*args, *rest, 63, "gaussian")


def test_all_raw_wc_reproduces_the_plain_gpt():
    """An all-token WC over the whole history, fed as inputs_embeds + gaussian rope, is the plain GPT."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=50, n_layer=2, n_embd=128))
    model.init_weights()
    cfg = MCConfig(block_size=4, recent=8, wc_budget=32, horizon=1)
    tokens = torch.randint(0, 50, (2, 30))  # 7 blocks + 2 partial tokens
    lod0 = model.transformer.wte(tokens)
    levels = [lod0, torch.zeros(2, 7, 128), torch.zeros(2, 1, 128)]
    next_token = torch.randint(0, 50, (2,))
    wc = materialize(torch.zeros(2, 7, dtype=torch.int8), levels, tokens, cfg, next_token=next_token)
    rope = wc_rope(wc.pos, wc.span, wc.lod, wc.valid, HD, "gaussian")
    with torch.no_grad():
        ids = entry_token_ids(wc.pos, wc.lod, tokens, wc.valid, wc.sample)
        loss = model(inputs_embeds=wc.embeds, token_ids=ids, rope=rope, targets=wc.targets, loss_reduction="none")
        targets = torch.cat([tokens[:, 1:], next_token[:, None]], dim=1)
        plain = model(tokens, targets, loss_reduction="none")
    assert torch.allclose(loss[:, :30], plain, atol=1e-5) and (loss[:, 30:] == 0).all()
