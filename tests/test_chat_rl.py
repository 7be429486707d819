"""GSM8K (answer extraction, reward, greedy accuracy) and scripts/chat_rl.py (policy gradient) on fixtures, offline."""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from nanochat import gsm8k
from nanochat.chat_tasks import TASKS, load_examples
from nanochat.checkpoint import checkpoint_dir, load_meta, load_model_and_tokenizer, load_module_states
from nanochat.common import get_report_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizers, optimizer_step
from scripts import base_train, chat_eval, chat_rl, chat_sft

SEQ = 128
MC = ["--mc", "--mc_block_size=8", "--mc_wc_budget=32", "--mc_recent=16", "--mc_horizon=8", "--mc_num_variants=3",
      "--mc_gist_layers=1", "--mc_lens_layers=1", "--mc_lens_width=32"]


def gsm8k_rows(n: int, seed: int = 0) -> list[dict]:
    """n short GSM8K-style rows with one-digit answers (so even a barely trained model sometimes earns a reward)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 4), rng.randint(1, 4)
        rows.append({"question": f"Ann has {a} cats and gets {b} more. How many cats?",
                     "answer": f"She has {a}+{b}=<<{a}+{b}={a + b}>>{a + b} cats.\n#### {a + b}"})
    return rows


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# -----------------------------------------------------------------------------
# answers and reward

@pytest.mark.parametrize("reply, answer", [
    ("18", "18"), ("18.0", "18"), ("$18", "18"), ("It costs $18.00 in total.", "18"), ("The answer is 18.", "18"),
    ("1,000 apples", "1000"), ("She pays 3 + 4 = 7, so 12,345", "12345"), ("2.50 dollars", "2.5"), ("-5 degrees", "-5"),
    ("from 3-5 people", "5"), ("1,2,3", "3"), ("x = 42, y = 7.", "7"), ("no number here", None), ("", None),
])
def test_extract_answer(reply, answer):
    assert gsm8k.extract_answer(reply) == answer


def test_reference_answer_and_normalisation():
    assert gsm8k.reference_answer("48/2 = <<48/2=24>>24 clips in May.\n#### 72") == "72"
    assert gsm8k.reference_answer("... so 1,000 in all\n#### 1,000") == "1000"
    assert gsm8k.reference_answer("#### 0.50") == "0.5"
    assert [gsm8k.normalize_number(t) for t in ("18", "18.0", "18.00", "$18", "0018", "abc")] == ["18"] * 5 + [None]
    with pytest.raises(ValueError, match="must end with '#### <number>'"):
        gsm8k.reference_answer("no marker, 42")


def test_reward_is_one_only_on_the_last_number():
    assert gsm8k.reward("5 + 13 = 18", "18") == 1.0
    assert gsm8k.reward("She has $18.0 left", "18") == 1.0
    assert gsm8k.reward("18, not 17", "18") == 0.0  # the last number counts
    assert gsm8k.reward("I do not know", "18") == 0.0
    assert gsm8k.reward("180", "18") == 0.0


def test_jsonl_rows_and_their_errors(tmp_path):
    task = TASKS["gsm8k"]
    path = write_rows(tmp_path / "ok.jsonl", gsm8k_rows(3))
    examples = load_examples(task, 2, path=path)
    assert len(examples) == 2 and examples[0]["messages"][0]["role"] == "user"
    assert "<<" not in examples[0]["messages"][1]["content"]  # calculator annotations removed, as for SFT
    assert examples[0]["answer"] == gsm8k.reference_answer(gsm8k_rows(1)[0]["answer"])
    bad = tmp_path / "bad.jsonl"
    for line, message in [('{"question": "q"}', "KeyError"), ("not json", "not valid JSON"),
                          ('{"question": "q", "answer": "42"}', "must end with '#### <number>'")]:
        bad.write_text(json.dumps(gsm8k_rows(1)[0]) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
            load_examples(task, 5, path=str(bad))


def test_greedy_accuracy_of_stub_replies(tiny_env):
    """chat_eval's GSM8K scoring: the last number of each reply against the answer; too-long prompts are skipped."""
    tok = tiny_env["tokenizer"]
    rows = [("q1", "18"), ("q2", "1,000"), ("q3", "7"), ("q4", "2.5"), ("long " * 80, "3")]
    examples = [TASKS["gsm8k"].convert({"question": q, "answer": f"work\n#### {a}"}) for q, a in rows]
    replies = {"q1": "So it is $18.00.", "q2": "1000 in total", "q3": "7 or maybe 8", "q4": "2.50", "long " * 80: "3"}
    result = chat_eval.eval_generative(examples, TASKS["gsm8k"].check, lambda messages: replies[messages[0]["content"]],
                                       tok, context=64)
    assert (result["n"], result["accuracy"], result["chance"], result["skipped_too_long"]) == (4, 0.75, 0.0, 1)


# -----------------------------------------------------------------------------
# the policy-gradient objective

def test_policy_batch_targets_only_the_reply_tokens():
    prompt, replies = [1, 2, 3], [[10, 11, 99], [12]]
    x, y = chat_rl.policy_batch(prompt, replies, pad_id=0, device="cpu")
    assert x.tolist() == [[1, 2, 3, 10, 11], [1, 2, 3, 12, 0]]
    assert y.tolist() == [[-1, -1, 10, 11, 99], [-1, -1, 12, -1, -1]]


def reply_logprob(model, prompt, reply) -> float:
    x, y = chat_rl.policy_batch(prompt, [reply], 0, "cpu")
    with torch.no_grad():
        return -model(x, y, loss_reduction="none").sum().item()


def test_a_step_makes_the_rewarded_sample_more_likely():
    """Two replies to one prompt, the first with reward 1 and the second 0: one optimizer step on the objective
    raises the log-probability of the rewarded reply and lowers that of the other (no sampling: deterministic)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_embd=64))
    model.init_weights()
    prompt, replies = [1, 5, 9, 2], [[20, 21, 22, 3], [40, 41, 3]]
    rewards = torch.tensor([1.0, 0.0])
    advantages = rewards - rewards.mean()
    before = [reply_logprob(model, prompt, r) for r in replies]
    optimizers = build_optimizers(model, matrix_lr=0.002, embedding_lr=0.02, unembedding_lr=0.004)
    x, y = chat_rl.policy_batch(prompt, replies, 0, "cpu")
    loss = chat_rl.policy_gradient_loss(model, x, y, advantages, (y >= 0).sum())
    loss.backward()
    optimizer_step(optimizers, list(model.parameters()), grad_clip=1.0)
    after = [reply_logprob(model, prompt, r) for r in replies]
    assert math.isfinite(loss.item())
    assert after[0] > before[0] + 1e-3 and after[1] < before[1] - 1e-3
    # equal rewards give no signal: the step changes nothing
    params = [p.detach().clone() for p in model.parameters()]
    optimizers = build_optimizers(model)
    chat_rl.policy_gradient_loss(model, x, y, torch.zeros(2), (y >= 0).sum()).backward()
    optimizer_step(optimizers, list(model.parameters()), grad_clip=1.0)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


# -----------------------------------------------------------------------------
# the script

def tiny_sft(data: str, base_tag: str, sft_tag: str, *extra):
    base_train.main([f"--data={data}", "--depth=1", "--width=64", f"--max_seq_len={SEQ}", "--device_batch_size=2",
                     f"--total_batch_size={2 * SEQ}", f"--eval_tokens={2 * SEQ}", "--num_iterations=2",
                     "--sample_every=-1", f"--tag={base_tag}", *extra])
    chat_sft.main(["--source=base", f"--source_tag={base_tag}", f"--tag={sft_tag}", "--data=identity",
                   "--num_conversations=16", "--val_conversations=4", "--num_iterations=2", "--device_batch_size=2",
                   "--rows_per_step=2", "--longdoc_filler=synthetic"])


@pytest.fixture(scope="module")
def rl_env(tiny_env, tmp_path_factory):
    tiny_sft(tiny_env["data"], "rlbase", "rlsft")
    data = write_rows(tmp_path_factory.mktemp("gsm8k") / "gsm8k.jsonl", gsm8k_rows(40))
    return dict(tiny_env, gsm8k=data)


RL = ["--source_tag=rlsft", "--questions_per_step=4", "--samples_per_question=8", "--device_batch_size=4",
      "--max_new_tokens=16", "--top_k=0", "--init_lr_frac=1", "--eval_every=2", "--device_type=cpu"]


def test_chat_rl_trains_saves_and_loads(rl_env):
    history = chat_rl.main([*RL, f"--data={rl_env['gsm8k']}", "--num_steps=4", "--tag=rl_smoke"])
    assert history["step"] == [1, 2, 3, 4] and history["eval_step"] == [0, 2, 4]
    assert all(math.isfinite(v) for v in history["loss"]) and all(0 <= r <= 1 for r in history["reward"])
    assert sum(history["reward"]) > 0  # some samples earned a reward, so some steps had a gradient
    model, tok, meta, directory = load_model_and_tokenizer("rl", "rl_smoke")
    sft = load_module_states(checkpoint_dir("sft", "rlsft"), 2)["gpt"]
    assert directory == checkpoint_dir("rl", "rl_smoke") and meta["step"] == 4 and meta["source"]["stage"] == "sft"
    assert any(not torch.equal(v, sft[k]) for k, v in model.state_dict().items() if k in sft)  # the policy moved
    assert meta["pretrain_data"] == rl_env["data"]  # what chat_eval needs for its long-document filler
    section = json.loads((get_report_dir() / "section-chat-rl.json").read_text())
    summary = section["items"][1]
    assert summary["mean reward (first step)"] == history["reward"][0] and summary["pass@1 after"] == history["pass1"][-1]
    assert (get_report_dir() / "rl_reward.png").read_bytes()[:4] == b"\x89PNG"

    # the rl stage is a source for chat_eval (GSM8K from a local file here) and chat_cli
    results = chat_eval.main(["--source=rl", "--tag=rl_smoke", "--num_longdoc=2", "--num_arc=0", "--max_tokens=4",
                              f"--gsm8k_data={rl_env['gsm8k']}", "--num_gsm8k=6"])
    assert results["checkpoint"] == "rl rl_smoke step 4"
    entry = results["gsm8k"]
    assert entry["n"] == 6 and entry["chance"] == 0.0 and 0 <= entry["accuracy"] <= 1
    assert "GSM8K" in (get_report_dir() / "section-chat-eval-rl.md").read_text()
    cli = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--source=rl", "--tag=rl_smoke", "--prompt", "hi",
                          "--max_tokens=4"], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=120, check=False)
    assert cli.returncode == 0 and "rl checkpoint" in cli.stderr, cli.stderr[-2000:]


def test_chat_eval_gsm8k_offline_and_skipped(rl_env):
    results = chat_eval.main(["--tag=rlsft", "--num_longdoc=1", "--num_arc=0", "--max_tokens=4"])
    assert results["gsm8k"] == {"skipped": "the HF hub is unreachable (offline)"}
    results = chat_eval.main(["--tag=rlsft", "--num_longdoc=1", "--num_arc=0", "--max_tokens=4", "--num_gsm8k=0"])
    assert results["gsm8k"] == {"skipped": "--num_gsm8k=0"}


def test_chat_rl_carries_the_mc_nets_unchanged(tiny_env, tmp_path):
    tiny_sft(tiny_env["data"], "rlmc", "rlmcsft", *MC)
    data = write_rows(tmp_path / "gsm8k.jsonl", gsm8k_rows(20))
    chat_rl.main([*RL, "--source_tag=rlmcsft", f"--data={data}", "--num_steps=1", "--samples_per_question=2", "--tag=rl_mc"])
    sft_dir, rl_dir = checkpoint_dir("sft", "rlmcsft"), checkpoint_dir("rl", "rl_mc")
    sft, rl = load_module_states(sft_dir, 2), load_module_states(rl_dir, 1)
    assert load_meta(rl_dir, 1)["mc_config"] == load_meta(sft_dir, 2)["mc_config"]
    for name in ("mc_gist", "mc_lens"):
        assert sft[name].keys() == rl[name].keys() and all(torch.equal(rl[name][k], sft[name][k]) for k in sft[name])
    from mc.build import load_mc_model
    load_mc_model("rl", "rl_mc")  # chat_cli --mc --source=rl loads it with its nets


def test_nothing_to_train_on(rl_env, tmp_path):
    with pytest.raises(SystemExit, match="error: nothing to train on: GSM8K is unavailable"):
        chat_rl.main([*RL, "--num_steps=1", "--tag=rl_offline"])  # --data=gsm8k, and the tests run offline
    assert not checkpoint_dir("rl", "rl_offline").exists()
    one = write_rows(tmp_path / "one.jsonl", gsm8k_rows(1))
    with pytest.raises(SystemExit, match="nothing to train on: it needs at least 2 rows"):
        chat_rl.main([*RL, f"--data={one}", "--tag=rl_one"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:1: .*a GSM8K solution must end with"):
        chat_rl.main([*RL, f"--data={bad}", "--tag=rl_bad"])
    with pytest.raises(SystemExit, match="expected gsm8k or a path to a .jsonl"):
        chat_rl.main([*RL, "--data=smoltalk", "--tag=rl_bad"])


def test_torchrun_two_gloo_ranks(rl_env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scripts.chat_rl",
           *RL, f"--data={rl_env['gsm8k']}", "--num_steps=2", "--samples_per_question=4", "--tag=rl_ddp"]
    result = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 rank(s)" in result.stdout and result.stdout.count("held-out questions") == 2  # rank 0 logs each evaluation once
    _, _, meta, _ = load_model_and_tokenizer("rl", "rl_ddp")
    assert meta["step"] == 2 and len(meta["history"]["reward"]) == 2


def test_questions_are_shared_out_over_the_ranks():
    cfg = chat_rl.RLConfig(questions_per_step=16)
    assert chat_rl.validate(cfg, 8) == 2
    with pytest.raises(chat_rl.ConfigError, match="--questions_per_step=16 must be a multiple of the number of ranks"):
        chat_rl.validate(cfg, 3)
