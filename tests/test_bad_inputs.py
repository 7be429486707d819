"""Bad input at every entry point ends in one line naming the problem and a non-zero exit, never a traceback,
and files changed on disk (checkpoints, sessions) are refused rather than loaded."""

import importlib
import os
import random
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint import CheckpointError, load_module_states, save_checkpoint
from nanochat.common import atomic_write_bytes
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import META_FILE, RANKS_FILE, TOKEN_BYTES_FILE

BAD_FLAGS = [  # (script, flags, what the message says)
    ("base_train", ["--total_batch_size=-128"], "--total_batch_size: must be >= 1, got -128"),
    ("base_train", ["--total_batch_size=0"], "--total_batch_size: must be >= 1"),
    ("base_train", ["--matrix_lr=nan"], "--matrix_lr: expected a finite number"),
    ("base_train", ["--embedding_lr=-1"], "--embedding_lr: must be >= 0"),
    ("base_train", ["--warmup_ratio=-0.5"], "--warmup_ratio: must be >= 0"),
    ("base_train", ["--log_every=0"], "--log_every: must be >= 1"),
    ("base_train", ["--width=-64"], "--width: must be >= 0"),
    ("base_train", ["--depth=two"], "--depth: expected an integer"),
    ("base_train", ["--window_pattern=SML"], "--window_pattern='SML': use the letters S (short) and L (long)"),
    ("base_train", ["--device_type=tpu"], "--device_type=tpu: choose cuda, mps or cpu"),
    ("base_train", ["--mc", "--mc_wc_budget=40", "--mc_recent=32", "--mc_block_size=16", "--max_seq_len=128",
                    "--device_batch_size=1", "--total_batch_size=128"], "could not chat"),
    ("mid_train", ["--num_iterations=0"], "--num_iterations: must be >= 1"),
    ("chat_sft", ["--rows_per_step=-1"], "--rows_per_step: must be >= 1"),
    ("chat_sft", ["--init_lr_frac=inf"], "--init_lr_frac: expected a finite number"),
    ("mc_eval", ["--batch_size=0"], "--batch_size: must be >= 1"),
    ("mc_eval", ["--needle_examples=-5"], "--needle_examples: must be >= 1"),
    ("chat_cli", ["--max_tokens", "-1"], "--max_tokens: must be >= 1"),
    ("chat_cli", ["--top_k", "-5"], "--top_k: must be >= 0"),
    ("chat_cli", ["--temperature", "-1"], "--temperature: must be >= 0"),
    ("base_eval", ["--batch_size=0"], "--batch_size: must be >= 1"),
    ("chat_eval", ["--num_arc=-1"], "--num_arc: must be >= 0"),
    ("tok_train", ["--vocab_size=0"], "--vocab_size: must be >= 1"),
    ("tok_eval", ["--max_docs=-1"], "--max_docs: must be >= 0"),
    ("bench_train", ["--steps=0"], "--steps: must be >= 1"),
    ("bench_train", ["--settings=fp16"], "--settings: a comma-separated subset of fp32,bf16"),
    ("base_train", ["--compile=yes"], "--compile: invalid choice"),
    ("bench_mc", ["--wc_budget=-8"], "--wc_budget: must be >= 4"),
    ("bench_infer", ["--repeats=0"], "--repeats: must be >= 1"),
]


def run_main(script: str, argv, capsys) -> tuple[int, str]:
    """Call scripts.<script>.main(argv) in-process: (exit code, what it printed to stderr or exited with)."""
    main = importlib.import_module(f"scripts.{script}").main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    message = capsys.readouterr().err + (code if isinstance(code, str) else "")
    return (1 if isinstance(code, str) else code), message


@pytest.mark.parametrize("script, flags, expected", BAD_FLAGS, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_flags_end_in_one_line(script, flags, expected, capsys):
    code, message = run_main(script, flags, capsys)
    lines = [line for line in message.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and expected in lines[0], message
    assert "Traceback" not in message


def test_a_bad_flag_through_the_real_cli():
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", "--total_batch_size=-128"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH="."))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["base_train.py: error: argument --total_batch_size: must be >= 1, got -128 "
                                                  "(see --help)"]


def test_corrupt_tokenizer_files_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MC_BASE_DIR", str(tmp_path))
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    for name in (RANKS_FILE, META_FILE, TOKEN_BYTES_FILE):
        (tok / name).write_bytes(b"\xff\x00 garbage")
    for script, argv in (("tok_eval", ["--max_docs=0"]), ("base_train", ["--data=books", "--depth=1"])):
        code, message = run_main(script, argv, capsys)
        assert code != 0 and "corrupt tokenizer file" in message and "Traceback" not in message, message


TINY_GPT = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_embd=64)


def tiny_checkpoint(directory):
    torch.manual_seed(0)
    model = GPT(TINY_GPT)
    model.init_weights()
    save_checkpoint(directory, 3, {"gpt": model}, None, {"model_config": {}})
    return directory / "model_000003.pt"


def test_changed_checkpoint_bytes_are_refused(tmp_path):
    path = tiny_checkpoint(tmp_path)
    good = path.read_bytes()
    assert set(load_module_states(tmp_path, 3)["gpt"]) == set(GPT(TINY_GPT).state_dict())
    rng = random.Random(0)
    for _ in range(20):  # 16 random bytes anywhere in the file: every trial is refused
        data = bytearray(good)
        at = rng.randrange(len(data) - 16)
        data[at:at + 16] = bytes(rng.randrange(256) for _ in range(16))
        if data == good:
            continue
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="changed since it was written|not a readable checkpoint"):
            load_module_states(tmp_path, 3)


@pytest.mark.parametrize("content", [b"hello world\n", b"", os.urandom(3000)], ids=["text", "empty", "random"])
def test_foreign_checkpoint_files_are_refused(tmp_path, content):
    path = tiny_checkpoint(tmp_path)
    (tmp_path / "meta_000003.json").write_text('{"format_version": 1, "model_config": {}}')  # no digest recorded
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_module_states(tmp_path, 3)


def test_unsafe_pickles_are_refused_without_unsafe_advice(tmp_path):
    path = tiny_checkpoint(tmp_path)
    (tmp_path / "meta_000003.json").write_text('{"format_version": 1, "model_config": {}}')
    torch.save({"gpt": {}, "extra": tmp_path}, path)  # a Path object: not allowed by weights_only
    with pytest.raises(CheckpointError) as info:
        load_module_states(tmp_path, 3)
    assert "Python objects besides tensors" in str(info.value) and "weights_only" not in str(info.value)


def test_failed_and_killed_writes_leave_no_temp_files(tmp_path):
    target = tmp_path / "file.bin"
    stale = tmp_path / "file.bin.tmp999999999"  # a temp file of a process that no longer runs
    stale.write_bytes(b"half")
    atomic_write_bytes(target, b"data")
    assert target.read_bytes() == b"data" and not stale.exists()
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError, match=f"could not write {tmp_path / 'dir'}"):
        atomic_write_bytes(tmp_path / "dir", b"data")  # replacing a directory fails
    assert not list(tmp_path.glob("dir.tmp*"))


def test_resume_reads_a_field_added_since_as_its_default():
    """A run saved before a flag existed resumes when the flag keeps its default, and names it when it does not."""
    from nanochat.checkpoint import config_changes
    saved = {"data": "books", "depth": 4}
    defaults = {"data": "fineweb-edu", "depth": 12, "text_column": "text"}
    assert config_changes(saved, {"data": "books", "depth": 4, "text_column": "text"}, (), defaults) == []
    assert config_changes(saved, {"data": "books", "depth": 4, "text_column": "body"}, (), defaults) == \
        ["--text_column: 'text' -> 'body'"]
    assert config_changes(saved, {"data": "books", "depth": 2}, (), defaults) == ["--depth: 4 -> 2"]
