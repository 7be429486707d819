"""Muon/AdamW set-up, and KV-cache sampling in the engine."""

import torch

from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizers, orthogonalize


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_orthogonalize_flattens_singular_values():
    G = torch.randn(32, 64) @ torch.diag(torch.logspace(-2, 1, 64))
    s = torch.linalg.svdvals(orthogonalize(G))
    assert 0.5 < s.min() and s.max() < 1.3


def test_muon_stacked_update_equals_one_matrix_at_a_time():
    models = [tiny_model(), tiny_model()]
    for model in models:
        for p in model.parameters():
            p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32)).view_as(p)
    stacked, single = (build_optimizers(m)[1] for m in models)
    stacked.stack, single.stack = True, False
    shapes = [p.shape for g in stacked.param_groups for p in g["params"]]
    assert len(set(shapes)) < len(shapes)  # some matrices share a shape: real batches form
    for _ in range(2):
        stacked.step()
        single.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(models[0].parameters(), tiny_model().parameters()))


def test_muon_orthogonalises_in_the_dtype_it_is_given():
    """The trainers pass their autocast dtype: bf16 on a CPU with fast bf16 matmuls gives bf16's update, not fp32's."""
    G = torch.randn(32, 64) @ torch.diag(torch.logspace(-2, 1, 64))
    s = torch.linalg.svdvals(orthogonalize(G, dtype=torch.bfloat16).float())
    assert 0.5 < s.min() and s.max() < 1.3
    updates = {}
    for dtype in (None, torch.bfloat16):
        model = tiny_model()
        for p in model.parameters():
            p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32)).view_as(p)
        muon = build_optimizers(model, ns_dtype=dtype)[1]
        assert muon.ns_dtype == dtype
        p = muon.param_groups[0]["params"][0]
        before = p.detach().clone()
        muon.step()
        updates[dtype] = p.detach() - before
    expected = -muon.param_groups[0]["lr"] * orthogonalize(torch.lerp(p.grad, 0.05 * p.grad, 0.95), dtype=torch.bfloat16)
    scale = max(1.0, p.shape[-2] / p.shape[-1]) ** 0.5
    torch.testing.assert_close(updates[torch.bfloat16], scale * expected)
    assert not torch.equal(updates[None], updates[torch.bfloat16])


def test_optimizer_groups_cover_every_parameter_once():
    model = tiny_model()
    adamw, muon = build_optimizers(model)
    seen = [p for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len({id(p) for p in seen}) == len(list(model.parameters()))
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert model.transformer.wte.weight in adamw.param_groups[0]["params"]
    assert all("initial_lr" in g for g in adamw.param_groups + muon.param_groups)


def test_adam_modules_train_their_matrices_with_adamw():
    """A side net passed as adam_modules has every parameter in AdamW at other_lr, none in Muon; with nothing left
    for Muon (the GPT frozen) there is no Muon at all."""
    model, side = tiny_model(), torch.nn.Sequential(torch.nn.Linear(64, 128, bias=False), torch.nn.Linear(128, 64))
    adamw, muon = build_optimizers(model, adam_modules=[side], other_lr=0.001)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    other = adamw.param_groups[-1]
    assert other["lr"] == 0.001 and all(any(p is q for q in other["params"]) for p in side.parameters())
    assert not in_muon & {id(p) for p in side.parameters()} and len(in_muon) == len(build_optimizers(model)[1].param_groups[0]["params"])
    model.requires_grad_(False)
    optimizers = build_optimizers(model, adam_modules=[side])
    assert len(optimizers) == 1 and isinstance(optimizers[0], torch.optim.AdamW)


def test_one_step_lowers_loss():
    model = tiny_model().train()
    optimizers = build_optimizers(model)
    idx = torch.randint(0, 64, (4, 32))
    before = model(idx, idx).item()
    for _ in range(3):
        model(idx, idx).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    assert model(idx, idx).item() < before


def naive_greedy(model, tokens, n):
    tokens = list(tokens)
    for _ in range(n):
        logits = model(torch.tensor([tokens]))[0, -1]
        tokens.append(int(logits.argmax()))
    return tokens


def test_kv_cache_greedy_equals_recompute():
    model = tiny_model()
    prompt = [1, 5, 9, 2]
    rows = Engine(model).generate_batch(prompt, num_samples=2, max_tokens=12, temperature=0.0)
    assert rows[0] == rows[1] == naive_greedy(model, prompt, 12)


def test_stop_tokens_and_seeded_sampling():
    model = tiny_model()
    engine = Engine(model)
    greedy = naive_greedy(model, [3], 6)
    stop = greedy[3]  # the third generated token
    first = greedy.index(stop, 1)
    row = engine.generate_batch([3], max_tokens=10, temperature=0.0, stop_tokens=[stop])[0]
    assert row == greedy[:first + 1]
    a = engine.generate_batch([3], num_samples=3, max_tokens=8, temperature=1.0, seed=7)
    b = engine.generate_batch([3], num_samples=3, max_tokens=8, temperature=1.0, seed=7)
    c = engine.generate_batch([3], num_samples=3, max_tokens=8, temperature=1.0, seed=8)
    assert a == b and a != c
    streamed = list(engine.generate([3], num_samples=3, max_tokens=8, temperature=1.0, seed=7))
    assert [[3] + [col[i] for col in streamed] for i in range(3)] == a
