"""chat_eval's benchmarks on local fixtures (offline, CPU): row conversion, multiple-choice scoring against a stub
model whose answer is known, HumanEval scoring in the sandbox, the sandbox's limits, ChatCORE, the offline
skip, and scripts.chat_eval end to end on a tiny checkpoint."""

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from nanochat.chat_tasks import TASKS, chatcore, humaneval_passed, humaneval_program, load_examples
from nanochat.common import get_report_dir
from nanochat.execution import run_program
from scripts import base_train, chat_eval

FIXTURES = Path(__file__).parent / "fixtures" / "chat_eval"
DATA_FLAGS = [f"--{key}_data={FIXTURES / key}.jsonl" for key in ("arc_easy", "arc_challenge", "mmlu", "humaneval")]
pytestmark = pytest.mark.usefixtures("one_thread")


def examples(key: str) -> list[dict]:
    return load_examples(TASKS[key], 100, path=FIXTURES / f"{key}.jsonl")


# ---- the sandbox -------------------------------------------------------------------------------------

def test_sandbox_passes_a_correct_program_and_fails_a_wrong_one():
    assert run_program("def f(x):\n    return 2 * x\n\nassert f(3) == 6\nprint('done')\n").status == "passed"
    wrong = run_program("def f(x):\n    return x + 2\n\nassert f(3) == 6\n")
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr
    assert run_program("def f(:\n").status == "failed"  # a syntax error
    # exiting with 0 before the end is not a pass: the tests after it never ran
    assert run_program("import sys\nsys.exit(0)\nassert False\n").status == "failed"
    assert run_program("import os\nos._exit(0)\n").status == "failed"


def test_sandbox_kills_an_endless_loop_at_the_time_limit():
    t0 = time.perf_counter()
    result = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout" and time.perf_counter() - t0 < 30


def test_sandbox_memory_limit():
    result = run_program("x = bytearray(8 << 30)\nprint('allocated')\n", memory_mb=512)
    assert result.status == "failed" and "MemoryError" in result.stderr and "allocated" not in result.stdout


def test_sandbox_output_is_capped():
    result = run_program("while True:\n    print('x' * 1000)\n", timeout_s=10.0)
    assert result.status == "failed" and len(result.stdout) <= 2000  # RLIMIT_FSIZE stopped it, not the clock


def test_sandbox_has_no_network(monkeypatch):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        result = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
        assert result.status == "failed" and "network access is disabled" in result.stderr
        # a process the program starts has plain sockets: only the network namespace stops it
        child = ("import socket\ntry:\n    socket.create_connection(('127.0.0.1', %d), timeout=2)\n    print('connected')\n"
                 "except OSError as e:\n    print('refused', e)\n" % port)
        result = run_program(f"import subprocess, sys\nprint(open('/proc/self/uid_map').read().strip() or 'unmapped', flush=True)\n"
                             f"subprocess.run([sys.executable, '-c', {child!r}])\n")
        assert result.status == "passed", result.stderr
        if not result.stdout.startswith("unmapped"):
            pytest.skip("this kernel does not let an unprivileged process create a network namespace")
        assert "refused" in result.stdout and "connected" not in result.stdout
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


def test_sandbox_environment_and_temp_dir(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("HF_TOKEN", "secret")
    result = run_program("import os\nprint(os.getcwd())\nprint(sorted(os.environ))\nopen('scratch.txt', 'w').write('x')\n")
    cwd, env = result.stdout.splitlines()
    assert result.passed and env == "['HOME', 'LANG', 'PATH']"
    assert Path(cwd).name.startswith("mc-exec-") and not Path(cwd).exists()  # removed, with what the program wrote


# ---- rows and scoring --------------------------------------------------------------------------------

def test_rows_become_examples():
    arc = examples("arc_challenge")
    assert [e["letters"] for e in arc][3] == ["1", "2", "3", "4"] and arc[3]["messages"][1]["content"] == "2"
    assert "\nB. gravity\n" in arc[0]["messages"][0]["content"]
    mmlu = examples("mmlu")
    assert [e["messages"][1]["content"] for e in mmlu] == ["B", "C", "A", "D", "B"]
    assert mmlu[0]["letters"] == ["A", "B", "C", "D"] and "\nB. 56\n" in mmlu[0]["messages"][0]["content"]
    he = examples("humaneval")
    assert he[0]["entry_point"] == "add_all" and he[0]["messages"][0]["content"].startswith("from typing import List")
    assert len(load_examples(TASKS["mmlu"], 2, path=FIXTURES / "mmlu.jsonl")) == 2


def test_bad_rows_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_examples(TASKS["mmlu"], 10, path=bad)
    bad.write_text(json.dumps({"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "E"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a ARC-Easy row .*'E' is not one of the choices"):
        load_examples(TASKS["arc_easy"], 10, path=bad)
    with pytest.raises(SystemExit, match="error: --mmlu_data: .*No such file"):
        chat_eval.main([f"--mmlu_data={tmp_path / 'missing.jsonl'}"])


class LetterStub(nn.Module):
    """Logits [B, T, V] that favour one letter right after <|assistant_start|> and are flat elsewhere (a padded
    position read by mistake would pick the first letter)."""

    def __init__(self, tokenizer, letter: str):
        super().__init__()
        self.lm_head = nn.Linear(1, tokenizer.vocab_size, bias=False)
        self.start, self.letter = tokenizer.encode_special("<|assistant_start|>"), tokenizer.encode(letter)[0]

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.lm_head.out_features)
        logits[..., self.letter] = (idx == self.start).float()
        return logits


@pytest.mark.parametrize("key", ["arc_easy", "arc_challenge", "mmlu"])
def test_multiple_choice_scoring(tiny_env, key):
    tokenizer, amp = tiny_env["tokenizer"], torch.autocast("cpu", enabled=False)
    exs = examples(key)
    for example in exs:  # the right letter is counted, any other is not
        answer = example["messages"][1]["content"]
        wrong = next(x for x in example["letters"] if x != answer)
        assert chat_eval.eval_multiple_choice(LetterStub(tokenizer, answer), tokenizer, [example], 512, amp, 1)["accuracy"] == 1
        assert chat_eval.eval_multiple_choice(LetterStub(tokenizer, wrong), tokenizer, [example], 512, amp, 1)["accuracy"] == 0
    # always "B", in padded batches of mixed lengths: exactly the questions whose answer is B are right
    expected = sum(e["messages"][1]["content"] == "B" for e in exs) / len(exs)
    chance = sum(1 / len(e["letters"]) for e in exs) / len(exs)
    for batch_size in (1, 3):
        result = chat_eval.eval_multiple_choice(LetterStub(tokenizer, "B"), tokenizer, exs, 512, amp, batch_size)
        assert result == {"n": len(exs), "accuracy": pytest.approx(expected), "chance": pytest.approx(chance),
                          "skipped_too_long": 0}
    lengths = sorted(len(tokenizer.render_for_completion(e["messages"][:1])) for e in exs)
    short = chat_eval.eval_multiple_choice(LetterStub(tokenizer, "B"), tokenizer, exs, lengths[1], amp, 2)
    assert short["n"] == 2 and short["skipped_too_long"] == len(exs) - 2  # prompts longer than the context


def test_humaneval_scoring(tiny_env):
    exs = examples("humaneval")
    add_all, shout, is_even = exs
    full = add_all["messages"][1]["content"]  # the prompt and the canonical body: a whole program
    assert humaneval_passed(add_all, full)
    assert humaneval_passed(add_all, "    return sum(numbers)\n")  # only the body: read as the prompt's continuation
    assert humaneval_passed(add_all, "Here it is:\n```python\ndef add_all(numbers):\n    return sum(numbers)\n```\nDone.")
    assert humaneval_passed(add_all, "```python\ndef add_all(numbers):\n    return sum(numbers)\n")  # cut off before the fence closed
    assert humaneval_passed(shout, "def shout(words):\n    return ' '.join(_upper(w) for w in words) + '!'\n")  # the prompt's helper
    assert not humaneval_passed(add_all, "def add_all(numbers):\n    return len(numbers)\n")
    assert not humaneval_passed(is_even, "    return n % 2 == 1\n")
    assert not humaneval_passed(is_even, "    import sys\n    sys.exit(0)\n")
    assert not humaneval_passed(is_even, "    while True:\n        pass\n")  # killed at the time limit
    assert humaneval_program(is_even, "    return True\n").endswith("\n\ncheck(is_even)\n")

    replies = {"add_all": "    return sum(numbers)\n", "shout": "    return words\n", "is_even": "    return not n % 2\n"}
    reply = lambda messages: replies[next(e["entry_point"] for e in exs if e["messages"][0] == messages[0])]  # noqa: E731
    tokenizer = tiny_env["tokenizer"]
    result = chat_eval.eval_generative(exs, TASKS["humaneval"].check, reply, tokenizer, 512)
    assert result["n"] == 3 and result["accuracy"] == pytest.approx(2 / 3) and result["chance"] == 0
    assert result["examples"][1].startswith("fail:") and result["skipped_too_long"] == 0
    longest = max(len(tokenizer.render_for_completion(e["messages"][:1])) for e in exs)
    assert chat_eval.eval_generative(exs, TASKS["humaneval"].check, reply, tokenizer, longest)["skipped_too_long"] == 1


def test_chatcore_centres_on_chance():
    results = {"arc_easy": {"n": 10, "accuracy": 0.5, "chance": 0.25},  # centred: 1/3
               "humaneval": {"n": 5, "accuracy": 0.2, "chance": 0.0},  # centred: 0.2
               "mmlu": {"n": 0, "accuracy": None, "chance": None}}  # nothing fit the context: not averaged
    score, keys = chatcore(results)
    assert score == pytest.approx((1 / 3 + 0.2) / 2) and keys == ["arc_easy", "humaneval"]
    assert chatcore({"mmlu": {"n": 4, "accuracy": 0.25, "chance": 0.25}}) == (0.0, ["mmlu"])  # chance level is 0
    assert chatcore({"mmlu": {"n": 4, "accuracy": 0.1, "chance": 0.25}})[0] < 0
    assert chatcore({}) == (None, [])


def test_offline_skip_is_one_line(capsys):
    # a dataset surely not in the local cache, so the real offline load path of `datasets` fails
    task = replace(TASKS["mmlu"], hub=("megacontext-tests/no-such-dataset", None, "test"))
    assert chat_eval.load_task(task, 5, "") == ([], {"skipped": "the HF hub is unreachable (offline)"})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("MMLU: skipped, the HF hub is unreachable (offline): ")
    assert chat_eval.load_task(task, 0, "") == ([], {"skipped": "--num_mmlu=0"})


# ---- end to end ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_env):
    base_train.main([f"--data={tiny_env['data']}", "--depth=1", "--width=64", "--max_seq_len=256",
                     "--device_batch_size=2", "--total_batch_size=512", "--eval_tokens=512", "--sample_every=-1",
                     "--num_iterations=2", "--tag=chateval"])
    return ["--source=base", "--tag=chateval", "--num_longdoc=2", "--max_tokens=4", "--longdoc_filler=synthetic"]


def test_chat_eval_end_to_end(tiny_checkpoint, capsys):
    results = chat_eval.main([*tiny_checkpoint, *DATA_FLAGS, "--batch_size=2"])
    saved = json.loads((get_report_dir() / "chat_eval.json").read_text())
    assert saved == json.loads(json.dumps(results))
    evaluated = ["arc_easy", "arc_challenge", "mmlu", "humaneval"]
    for key, n in zip(evaluated, (4, 4, 5, 3)):
        assert saved[key]["n"] == n and 0 <= saved[key]["accuracy"] <= 1 and 0 <= saved[key]["chance"] < 1
    assert saved["humaneval"]["chance"] == 0 and saved["mmlu"]["chance"] == 0.25
    assert "skipped" in saved["gsm8k"]  # no local file for it
    assert saved["chatcore_tasks"] == evaluated and isinstance(saved["chatcore"], float)
    assert saved["chatcore"] == pytest.approx(chatcore({k: saved[k] for k in evaluated})[0])
    assert "longdoc_qa" in saved and "samples" in saved
    summary = json.loads((get_report_dir() / "section-chat-eval-base.json").read_text())["items"][0]
    assert set(summary) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"}
    assert summary["GSM8K"] == "skipped" and summary["MMLU"] == f"{saved['mmlu']['accuracy']:.3f}"

    # a task set to 0 is skipped and left out of ChatCORE; with no local file the hub is tried and skipped offline
    capsys.readouterr()
    saved = chat_eval.main([*tiny_checkpoint, *DATA_FLAGS[:3], "--num_mmlu=0"])
    assert saved["mmlu"] == {"skipped": "--num_mmlu=0"}
    assert saved["humaneval"] == {"skipped": "the HF hub is unreachable (offline)"}
    assert saved["chatcore_tasks"] == ["arc_easy", "arc_challenge"]
    assert "HumanEval: skipped, the HF hub is unreachable (offline): " in capsys.readouterr().out


def test_help_names_every_task_flag():
    result = subprocess.run([sys.executable, "-m", "scripts.chat_eval", "--help"], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0
    for flag in ("--num_arc ", "--num_arc_challenge", "--num_mmlu", "--num_humaneval", "--arc_easy_data",
                 "--arc_challenge_data", "--mmlu_data", "--humaneval_data", "--batch_size"):
        assert flag in result.stdout
