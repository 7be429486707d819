"""The chat CLI (run as a subprocess, like a user would) and chat_eval, on a tiny SFT checkpoint."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from nanochat.common import get_report_dir
from scripts import base_train, chat_eval, chat_sft

SEQ = 128


@pytest.fixture(scope="module")
def tiny_sft(tiny_env):
    base_train.main([f"--data={tiny_env['data']}", "--depth=1", "--width=64", f"--max_seq_len={SEQ}",
                     "--device_batch_size=2", f"--total_batch_size={2 * SEQ}", f"--eval_tokens={2 * SEQ}",
                     "--num_iterations=2", "--sample_every=-1", "--tag=clibase"])
    chat_sft.main(["--source=base", "--source_tag=clibase", "--tag=clisft", "--data=identity", "--num_conversations=16",
                   "--val_conversations=4", "--num_iterations=2", "--device_batch_size=2", "--rows_per_step=2",
                   "--longdoc_filler=synthetic"])
    return tiny_env


def cli(*args, stdin: str = "", base_dir=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if base_dir is not None:
        env["MC_BASE_DIR"] = str(base_dir)
    return subprocess.run([sys.executable, "-m", "scripts.chat_cli", *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_answers_a_piped_prompt(tiny_sft):
    result = cli("--prompt", "-", "--tag=clisft", "--temperature=0", "--max_tokens=8", stdin="Who are you?\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sft checkpoint" in result.stderr and result.stdout.endswith("\n")


def test_piped_lines_are_turns_with_commands(tiny_sft):
    stdin = "Hello\n/clear\nWho are you?\n/bogus\n/quit\nnot read\n"
    result = cli("--tag=clisft", "--max_tokens=4", stdin=stdin)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(new conversation)" in result.stderr and "unknown command /bogus" in result.stderr
    assert result.stdout.count("\n") == 2  # two replies, one line each


def test_context_full_is_said_plainly(tiny_sft):
    long_prompt = "tell me more about this " * 40  # well over the 128-token context
    result = cli("--prompt", long_prompt, "--tag=clisft", "--max_tokens=4")
    assert result.returncode == 1
    assert f"no longer fits the model's context of {SEQ} tokens" in result.stderr and "/clear" in result.stderr
    assert "Traceback" not in result.stderr
    # in a conversation it is a message, not the end: /clear starts over and the chat goes on
    result = cli("--tag=clisft", "--max_tokens=4", stdin=f"{long_prompt}\n/clear\nHi\n")
    assert result.returncode == 0 and "no longer fits" in result.stderr and result.stdout.count("\n") == 1


def test_missing_checkpoint(tiny_sft, tmp_path):
    result = cli("--prompt", "hi", base_dir=tmp_path)
    assert result.returncode != 0
    assert "no sft checkpoint found" in result.stderr and "run10.sh" in result.stderr
    assert "Traceback" not in result.stderr


def test_chat_eval_end_to_end(tiny_sft):
    results = chat_eval.main(["--tag=clisft", "--num_longdoc=6", "--num_arc=3", "--max_tokens=4"])
    saved = json.loads((get_report_dir() / "chat_eval.json").read_text())
    assert saved == json.loads(json.dumps(results))
    longdoc = saved["longdoc_qa"]
    assert longdoc["n"] + longdoc["skipped_too_long"] == 6 and len(longdoc["by_depth"]) == 5
    assert "skipped" in saved["arc_easy"]  # the tests run offline
    assert saved["chat_memory"] == {"skipped": "not a MegaContext checkpoint"}
    section = (get_report_dir() / "section-chat-eval-sft.md").read_text()
    assert "Long-document QA" in section and "ARC-Easy" in section
    with pytest.raises(SystemExit, match="no sft checkpoint found"):
        chat_eval.main(["--tag=never_trained"])


# ---- --mc: an unbounded conversation over an MCSession --------------------------------------------

MC = ["--mc", "--mc_block_size=8", "--mc_wc_budget=32", "--mc_recent=16", "--mc_horizon=8", "--mc_num_variants=3",
      "--mc_gist_layers=1", "--mc_lens_layers=1", "--mc_lens_width=32"]


@pytest.fixture(scope="module")
def tiny_mc_sft(tiny_env):
    base_train.main([f"--data={tiny_env['data']}", "--depth=1", "--width=64", f"--max_seq_len={SEQ}",
                     "--device_batch_size=2", f"--total_batch_size={2 * SEQ}", f"--eval_tokens={2 * SEQ}",
                     "--num_iterations=2", "--sample_every=-1", "--tag=climc", *MC])
    sft = ["--source=base", "--source_tag=climc", "--tag=climcsft", "--data=identity", "--num_conversations=16",
           "--val_conversations=4", "--num_iterations=2", "--device_batch_size=2", "--rows_per_step=2",
           "--longdoc_filler=synthetic"]
    with pytest.raises(SystemExit, match=r"--mc_memory_rows=2: memory rows need a context of >= 191 tokens"):
        chat_sft.main([*sft, "--mc_memory_rows=2"])  # the rehearsal needs a longer context than this tiny model's
    chat_sft.main(sft)
    return tiny_env


def test_sft_carries_the_mc_nets(tiny_mc_sft):
    from nanochat.checkpoint import checkpoint_dir, load_meta, load_module_states
    base_states = load_module_states(checkpoint_dir("base", "climc"), 2)
    sft_dir = checkpoint_dir("sft", "climcsft")
    states, meta = load_module_states(sft_dir, 2), load_meta(sft_dir, 2)
    assert meta["mc_config"]["wc_budget"] == 32
    for name in ("mc_gist", "mc_lens"):
        assert all(torch.equal(states[name][k], base_states[name][k]) for k in base_states[name])
    assert not all(torch.equal(states["gpt"][k], base_states["gpt"][k]) for k in base_states["gpt"])  # the GPT was fine-tuned


def test_mc_chat_goes_past_the_context_and_saves_loads(tiny_mc_sft, tmp_path):
    # the plain CLI refuses this prompt (test_context_full_is_said_plainly); with --mc it is just history
    long_prompt = "tell me more about this " * 40
    session_file, focus_png = tmp_path / "chat.mcs", tmp_path / "focus.png"
    stdin = f"{long_prompt}\nHi\n/stats\n/focus {focus_png}\n/save {session_file}\n/bogus\n"
    result = cli("--mc", "--tag=climcsft", "--max_tokens=6", "--temperature=0", stdin=stdin)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MegaContext: unbounded history, working context W=32" in result.stderr
    # two replies (a tiny model's reply may hold newlines of its own)
    assert result.stdout.endswith("\n") and result.stdout.count("\n") >= 2 and "no longer fits" not in result.stderr
    stats = next(line for line in result.stderr.splitlines() if line.startswith("history "))
    history = int(stats.split()[1].replace(",", ""))
    assert history > SEQ and "working context" in stats and "refocuses" in stats
    assert re.search(r"LOD\d gists", result.stderr) and "raw tokens" in result.stderr
    assert focus_png.read_bytes()[:4] == b"\x89PNG" and session_file.exists()
    assert f"saved the conversation ({history:,} tokens of history)" in result.stderr
    assert "unknown command /bogus" in result.stderr

    # quit, load and continue: the loaded conversation goes on from the same history
    result = cli("--mc", "--tag=climcsft", "--max_tokens=6", f"--load={session_file}", stdin="Who are you?\n/stats\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"loaded {session_file}: {history:,} tokens of history" in result.stderr
    after = next(line for line in result.stderr.splitlines() if line.startswith("history "))
    assert int(after.split()[1].replace(",", "")) > history

    # a foreign file is refused with a clear message, and the conversation goes on
    foreign, text = tmp_path / "foreign.mcs", tmp_path / "notes.txt"
    foreign.write_bytes(b"not a session")
    text.write_text("hello world\n")  # unpickling text raised a KeyError that ended the chat
    result = cli("--mc", "--tag=climcsft", "--max_tokens=4", stdin=f"/load {foreign}\n/load {text}\nHi\n")
    assert result.returncode == 0 and result.stderr.count("/load failed") == 2 and "Traceback" not in result.stderr
    assert "not a readable MegaContext session" in result.stderr
    assert result.stdout.endswith("\n") and result.stdout.strip()  # the reply to Hi


def test_mc_answers_a_piped_prompt_and_plain_refuses_mc_commands(tiny_mc_sft):
    result = cli("--mc", "--prompt", "-", "--tag=climcsft", "--temperature=0", "--max_tokens=8", stdin="Who are you?\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.endswith("\n")
    result = cli("--tag=climcsft", "--max_tokens=4", stdin="/stats\n")
    assert result.returncode == 0 and "/stats needs MegaContext: start the chat with --mc" in result.stderr


def test_mc_needs_mc_nets(tiny_sft):
    result = cli("--mc", "--prompt", "hi", "--tag=clisft")
    assert result.returncode != 0 and "has no MegaContext nets" in result.stderr and "run10.sh --mc" in result.stderr
    assert "Traceback" not in result.stderr


def test_chat_eval_measures_chat_memory_of_an_mc_checkpoint(tiny_mc_sft):
    results = chat_eval.main(["--tag=climcsft", "--num_longdoc=0", "--num_arc=0", "--num_memory=3", "--memory_distance=4"])
    memory = results["chat_memory"]
    assert memory["n"] == 3 and memory["wc_budget"] == 32 and 0 <= memory["accuracy"] <= 1
    assert 2 <= memory["mean_distance_W"] <= 8  # the filler is sized to put the fact ~4 W back
    assert sum(b["n"] for b in memory["by_distance"]) == 3 and len(memory["examples"]) == 3
    section = (get_report_dir() / "section-chat-eval-sft.md").read_text()
    assert "Chat memory (MegaContext" in section and "chat memory (MC)" in section
    plain = chat_eval.main(["--tag=climcsft", "--num_longdoc=0", "--num_arc=0", "--num_memory=0"])
    assert plain["chat_memory"] == {"skipped": "--num_memory=0"}
