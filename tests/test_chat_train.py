"""Mid-training and SFT: the conversation batcher (packing, padding, targets, exact resume) and smoke runs."""

import itertools
import json
import math
import random
import shutil

import pytest
import torch

from nanochat.chat_data import identity_conversation
from nanochat.chat_train import ChatBatcher, fit_longdoc, pretraining_data
from nanochat.checkpoint import build_model, checkpoint_dir, load_module_states
from nanochat.common import get_report_dir
from nanochat.longdoc_qa import longdoc_qa
from scripts import base_train, chat_sft, mid_train

SEQ = 128
CHAT = ["--source=base", "--source_tag=chatbase", "--device_batch_size=2", "--rows_per_step=4",
        "--num_conversations=48", "--val_conversations=8", "--eval_every=2", "--log_every=1"]


@pytest.fixture(scope="module")
def tiny_base(tiny_env):
    base_train.main([f"--data={tiny_env['data']}", "--depth=1", "--width=64", f"--max_seq_len={SEQ}",
                     "--device_batch_size=2", f"--total_batch_size={2 * SEQ}", f"--eval_tokens={2 * SEQ}",
                     "--num_iterations=3", "--sample_every=-1", "--tag=chatbase"])
    return tiny_env


def conversations(n: int) -> list[dict]:
    return [identity_conversation(random.Random(i)) for i in range(n)]


def numbered(n: int) -> list[dict]:
    """n short conversations, all different."""
    return [{"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                          {"role": "assistant", "content": f"It is {i + 1}."}]} for i in range(n)]


# -----------------------------------------------------------------------------
# the batcher

def test_packed_rows_hold_whole_conversations(tiny_env):
    tok, bos = tiny_env["tokenizer"], tiny_env["tokenizer"].bos_token_id
    convs = conversations(40)
    rendered = [tuple(tok.render_conversation(c)[0]) for c in convs]
    masks = {tuple(ids): mask for ids, mask in map(tok.render_conversation, convs)}
    batcher = ChatBatcher(tok, convs, batch_size=3, seq_len=399, pack=True, seed=1, single_pass=True)
    seen, n_rows = [], 0
    while (row := batcher._next_row()) is not None:
        n_rows += 1
        ids, mask = row[0].tolist(), row[1].tolist()
        assert len(ids) == 400 and ids[0] == bos  # full rows, BOS-aligned
        starts = [i for i, t in enumerate(ids) if t == bos] + [len(ids)]
        for a, b in itertools.pairwise(starts):
            if b - a == 1 and mask[a] == 0:
                continue  # padding: one BOS, no target
            assert tuple(ids[a:b]) in masks, "a conversation was cut or altered"
            assert mask[a:b] == masks[tuple(ids[a:b])]
            seen.append(tuple(ids[a:b]))
    assert sorted(seen) == sorted(rendered)  # every conversation exactly once per epoch
    assert batcher.dropped == 0 and sum(map(len, seen)) / (400 * n_rows) > 0.8  # best fit leaves little padding


@pytest.mark.parametrize("pack", [True, False])
def test_targets_are_next_tokens_where_the_mask_is_set(tiny_env, pack):
    tok = tiny_env["tokenizer"]
    convs = conversations(20)
    rows_of = ChatBatcher(tok, convs, batch_size=4, seq_len=200, pack=pack, single_pass=True)
    for x, y in ChatBatcher(tok, convs, batch_size=4, seq_len=200, pack=pack, single_pass=True):
        for b in range(x.size(0)):
            ids, mask = rows_of._next_row()
            n = len(ids) - 1
            assert x[b, :n].tolist() == ids[:-1].tolist()
            assert y[b, :n].tolist() == [int(t) if m else -1 for t, m in zip(ids[1:], mask[1:])]
            assert (y[b, n:] == -1).all() and (x[b, n + 1:] == tok.bos_token_id).all()  # right padding (padded mode)
            assert not pack or n == 200


def test_padded_rows_one_conversation_each(tiny_env):
    tok = tiny_env["tokenizer"]
    convs = conversations(10)
    rendered = sorted(tok.render_conversation(c)[0] for c in convs)
    rows = ChatBatcher(tok, convs, batch_size=4, seq_len=399, pack=False, single_pass=True)
    assert sorted(row[0].tolist() for row in iter(rows._next_row, None)) == rendered
    widths = [x.size(1) for x, _ in ChatBatcher(tok, convs, batch_size=4, seq_len=399, pack=False, single_pass=True)]
    assert len(widths) == 3 and max(widths) == max(map(len, rendered)) - 1  # padded to the batch's longest row


def test_too_long_conversations_are_dropped_not_cut(tiny_env):
    tok = tiny_env["tokenizer"]
    long_conv = {"messages": [{"role": "user", "content": "word " * 600}, {"role": "assistant", "content": "ok"}]}
    convs = conversations(6) + [long_conv]
    for pack in (True, False):
        batcher = ChatBatcher(tok, convs, batch_size=2, seq_len=399, pack=pack, single_pass=True)
        kept = [row[0] for row in iter(batcher._next_row, None)]
        assert batcher.dropped == 1 and kept and all(len(ids) <= 400 for ids in kept)
    with pytest.raises(ValueError, match="no conversation fits"):
        next(ChatBatcher(tok, [long_conv], batch_size=1, seq_len=399, pack=True))


@pytest.mark.parametrize("pack", [True, False])
def test_batcher_resume_is_exact(tiny_env, pack):
    tok = tiny_env["tokenizer"]
    convs = conversations(30)
    a = ChatBatcher(tok, convs, batch_size=3, seq_len=128, pack=pack, seed=7)
    for _ in range(5):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON/pickle
    expected = [next(a) for _ in range(12)]  # crosses an epoch boundary
    assert a.epoch >= 1
    b = ChatBatcher(tok, convs, batch_size=3, seq_len=128, pack=pack, seed=7).load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [next(b) for _ in range(12)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ValueError, match="seed"):
        ChatBatcher(tok, convs, batch_size=3, seq_len=128, pack=pack, seed=8).load_state_dict(state)


def test_ranks_read_disjoint_conversations(tiny_env):
    tok = tiny_env["tokenizer"]
    convs = numbered(12)
    seen = []
    for rank in range(2):
        batcher = ChatBatcher(tok, convs, batch_size=1, seq_len=64, pack=False, rank=rank, world_size=2, single_pass=True)
        seen.append({tuple(row[0].tolist()) for row in iter(batcher._next_row, None)})
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]


def test_fit_longdoc_fills_the_context(tiny_env):
    tok = tiny_env["tokenizer"]
    cfg = fit_longdoc(tok, 256)
    lengths = [len(tok.render_conversation(c)[0]) for c in longdoc_qa(20, cfg)]
    assert sum(n <= 257 for n in lengths) >= 15  # most fit; the rest is dropped, never truncated
    assert sum(lengths) / len(lengths) > 0.6 * 256  # and they use the context


# -----------------------------------------------------------------------------
# the scripts

def test_sft_smoke_and_resume(tiny_base):
    chat_sft.main([*CHAT, "--num_iterations=4", "--save_every=2", "--tag=sft_full", "--data=identity,longdoc_qa",
                   "--longdoc_filler=synthetic"])
    model, _, meta = build_model(checkpoint_dir("sft", "sft_full"), None, "cpu")
    assert meta["step"] == 4 and model.config.sequence_len == SEQ and meta["source"]["stage"] == "base"
    history = meta["history"]
    assert len(history["val_loss"]) == 3 and all(math.isfinite(v) for v in history["val_loss"])
    section = (get_report_dir() / "section-chat-sft.md").read_text()
    assert "final val loss" in section and "dropped" in section
    items = json.loads((get_report_dir() / "section-chat-sft.json").read_text())["items"]
    bpb = next(item["final val bpb"] for item in items if isinstance(item, dict) and "final val bpb" in item)
    assert 0 < bpb < 20  # bits per byte of the assistant tokens (the report card's SFT column)

    full_dir, part_dir = checkpoint_dir("sft", "sft_full"), checkpoint_dir("sft", "sft_part")
    part_dir.mkdir(parents=True, exist_ok=True)
    for f in full_dir.glob("*_000002*"):
        shutil.copy(f, part_dir / f.name)
    chat_sft.main([*CHAT, "--num_iterations=4", "--save_every=2", "--tag=sft_part", "--data=identity,longdoc_qa",
                   "--longdoc_filler=synthetic", "--resume"])
    a, b = load_module_states(full_dir, 4)["gpt"], load_module_states(part_dir, 4)["gpt"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mid_smoke_packs_rows(tiny_base):
    mid_train.main([*CHAT, "--num_iterations=3", "--tag=mid_smoke", "--data=identity,longdoc_qa"])
    _, _, meta = build_model(checkpoint_dir("mid", "mid_smoke"), None, "cpu")
    assert meta["step"] == 3 and (meta["pretrain_data"], meta["pretrain_text_column"]) == (tiny_base["data"], "text")
    assert len(meta["history"]["loss"]) == 3 and all(math.isfinite(v) for v in meta["history"]["loss"])
    section = (get_report_dir() / "section-mid-train.md").read_text()
    assert "packed rows" in section and "row fill" in section


def test_pretraining_data_carries_the_text_column():
    """The chat stages read filler from the pretraining corpus with the column it was built from."""
    assert pretraining_data({"train_config": {"data": "/corpus", "text_column": "body"}}) == ("/corpus", "body")
    assert pretraining_data({"train_config": {"data": "books"}}) == ("books", "text")  # a checkpoint from before the flag
    sft_meta = {"pretrain_data": "/corpus", "pretrain_text_column": "body", "train_config": {"data": "identity"}}
    assert pretraining_data(sft_meta) == ("/corpus", "body")


def test_user_errors(tiny_base):
    with pytest.raises(SystemExit, match="rows_per_step"):
        chat_sft.main([*CHAT, "--rows_per_step=3"])
    with pytest.raises(SystemExit, match="unknown chat data source"):
        chat_sft.main([*CHAT, "--data=nonsense"])
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        chat_sft.main([*CHAT, "--tag=never_trained", "--resume"])
    with pytest.raises(SystemExit, match="does not exist|no mid checkpoints"):
        chat_sft.main([*CHAT, "--source=mid", "--source_tag=missing"])


# -----------------------------------------------------------------------------
# a MegaContext checkpoint: its nets train on memory rows beside the conversations (mc/rehearsal.py)

MC_SEQ = 384  # a memory conversation with the tiny tokenizer takes ~200 tokens
MC = ["--mc", "--mc_block_size=8", "--mc_wc_budget=64", "--mc_recent=16", "--mc_horizon=8", "--mc_num_variants=3",
      "--mc_gist_layers=1", "--mc_lens_layers=1", "--mc_lens_width=32"]
MC_CHAT = ["--source=base", "--source_tag=chatmc", "--device_batch_size=2", "--rows_per_step=2", "--num_conversations=24",
           "--val_conversations=4", "--eval_every=2", "--log_every=1", "--mc_memory_rows=1", "--data=identity",
           "--longdoc_filler=synthetic"]


@pytest.fixture(scope="module")
def tiny_mc_base(tiny_env):
    base_train.main([f"--data={tiny_env['data']}", "--depth=1", "--width=64", f"--max_seq_len={MC_SEQ}",
                     "--device_batch_size=2", f"--total_batch_size={2 * MC_SEQ}", f"--eval_tokens={2 * MC_SEQ}",
                     "--num_iterations=2", "--sample_every=-1", "--tag=chatmc", *MC])
    return tiny_env


def test_mc_chat_stage_trains_the_nets_on_memory_rows_and_resumes_exactly(tiny_mc_base):
    base = load_module_states(checkpoint_dir("base", "chatmc"), 2)
    mid_train.main([*MC_CHAT, "--num_iterations=4", "--save_every=2", "--tag=mcmid_full"])
    full_dir = checkpoint_dir("mid", "mcmid_full")
    states = load_module_states(full_dir, 4)
    _, _, meta = build_model(full_dir, 4, "cpu")
    assert meta["mc_config"]["wc_budget"] == 64  # chat_cli --mc rebuilds the same nets
    for name in ("gpt", "mc_gist", "mc_lens"):  # all three trained
        assert not all(torch.equal(states[name][k], base[name][k]) for k in base[name]), name
    history = meta["history"]
    assert len(history["memory_loss"]) == 4 and all(math.isfinite(v) for v in history["memory_loss"])
    assert all(0 <= v <= 1 for v in history["lens_hit"])
    section = (get_report_dir() / "section-mid-train.md").read_text()
    assert "MegaContext rehearsal" in section and "1 memory rows per step" in section and "LensNet hit rate" in section

    part_dir = checkpoint_dir("mid", "mcmid_part")  # resume from step 2: the same nets and GPT at step 4
    part_dir.mkdir(parents=True, exist_ok=True)
    for f in full_dir.glob("*_000002*"):
        shutil.copy(f, part_dir / f.name)
    mid_train.main([*MC_CHAT, "--num_iterations=4", "--save_every=2", "--tag=mcmid_part", "--resume"])
    resumed = load_module_states(part_dir, 4)
    for name in ("gpt", "mc_gist", "mc_lens"):
        assert all(torch.equal(states[name][k], resumed[name][k]) for k in states[name]), name


def test_mc_chat_stage_without_rehearsal_carries_the_nets(tiny_mc_base):
    base = load_module_states(checkpoint_dir("base", "chatmc"), 2)
    chat_sft.main([*MC_CHAT, "--num_iterations=2", "--tag=mcsft_carry", "--mc_memory_rows=0"])
    states = load_module_states(checkpoint_dir("sft", "mcsft_carry"), 2)
    for name in ("mc_gist", "mc_lens"):
        assert all(torch.equal(states[name][k], base[name][k]) for k in base[name])
    assert not all(torch.equal(states["gpt"][k], base["gpt"][k]) for k in base["gpt"])
