"""End-to-end pretraining: smoke run, exact resume, torchrun with two gloo ranks, bad input."""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanochat.checkpoint import CheckpointError, build_model, checkpoint_dir, load_meta, load_module_states, load_training_state
from nanochat.common import cpu_compiler
from nanochat import report
from scripts import base_eval, base_train

TINY = ["--depth=1", "--width=64", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=256",
        "--eval_tokens=256", "--log_every=1", "--sample_every=-1"]


def run_train(tiny_env, *extra):
    return base_train.main([f"--data={tiny_env['data']}", *TINY, *extra])


def test_smoke_trains_and_reports(tiny_env):
    run_train(tiny_env, "--num_iterations=8", "--tag=smoke", "--eval_every=4")
    model, _, meta = build_model(checkpoint_dir("base", "smoke"), None, "cpu")
    assert meta["step"] == 8 and model.config.n_embd == 64
    val = meta["history"]["val_bpb"]
    assert len(val) == 3 and val[-1] < val[0]  # validation improves
    from nanochat.common import get_report_dir
    assert (get_report_dir() / "base_loss.png").exists()
    assert "final val bpb" in (get_report_dir() / "section-base-train.md").read_text()
    base_eval.main(["--tag=smoke", "--eval_tokens=256", "--batch_size=2", "--max_tokens=4"])
    report_md = open(report.generate()).read()
    assert "Base model evaluation" in report_md and "Base model training" in report_md and "torch" in report_md
    with pytest.raises(SystemExit, match="does not exist"):
        base_eval.main(["--tag=nope"])


def test_a_peak_measured_under_contention_is_measured_again(tiny_env, monkeypatch):
    """MFU above 100 % means the start-up matmul peak was measured while something else ran: training measures
    it again and keeps the larger, so the printed and reported MFU are against the real peak."""
    peaks = [1.0, 1e18]  # a start-up peak far too low, then the real one
    calls = []
    monkeypatch.setattr(base_train, "measure_matmul_flops", lambda *a: calls.append(1) or peaks[min(len(calls), 2) - 1])
    run_train(tiny_env, "--num_iterations=3", "--tag=peak")
    from nanochat.common import get_report_dir
    assert len(calls) == 2, "measured at start-up and once more at the first step above 100 %"
    mean = re.search(r"MFU \(mean\)[^\d]*([\d.]+)%", (get_report_dir() / "section-base-train.md").read_text())
    assert mean and float(mean.group(1)) < 100


def test_resume_is_exact(tiny_env):
    run_train(tiny_env, "--num_iterations=4", "--save_every=2", "--tag=full")
    full_dir, part_dir = checkpoint_dir("base", "full"), checkpoint_dir("base", "part")
    part_dir.mkdir(parents=True, exist_ok=True)
    for f in full_dir.glob("*_000002*"):
        shutil.copy(f, part_dir / f.name)
    run_train(tiny_env, "--num_iterations=4", "--save_every=2", "--tag=part", "--resume")
    a, b = load_module_states(full_dir, 4)["gpt"], load_module_states(part_dir, 4)["gpt"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_runs_killed_at_random_points_resume_to_the_same_weights(tiny_env):
    """SIGKILL a training run three times at random moments (mid-step or mid-checkpoint), resume after each:
    the final weights equal those of a run never interrupted."""
    # a fixed autocast dtype: "auto" measures matmul speed, which a busy machine can tip between the in-process
    # run and the first killed one (a resumed run keeps its first run's choice: test below)
    args = [f"--data={tiny_env['data']}", *TINY, "--num_iterations=10", "--save_every=1", "--eval_every=100", "--cpu_bf16=off"]
    run_train(tiny_env, *args[len(TINY) + 1:], "--tag=unkilled")
    ckpt, rng = checkpoint_dir("base", "killed"), random.Random(0)
    cmd = [sys.executable, "-m", "scripts.base_train", *args, "--tag=killed"]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    for kill in range(3):
        done = len(list(ckpt.glob("meta_*.json")))
        proc = subprocess.Popen(cmd + (["--resume"] if done else []), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while len(list(ckpt.glob("meta_*.json"))) <= done and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)  # at least one new checkpoint, so the next start has something to resume
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(cmd + ["--resume"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = load_module_states(checkpoint_dir("base", "unkilled"), 10)["gpt"], load_module_states(ckpt, 10)["gpt"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_keeps_the_autocast_dtype_auto_chose(tiny_env, monkeypatch):
    """--cpu_bf16=auto measures speed once per run; the resumed run uses what the first run chose."""
    from nanochat import common
    monkeypatch.setattr(common, "cpu_bf16_speedup", lambda: 10.0)  # bf16 looks fast: auto takes it
    run_train(tiny_env, "--num_iterations=3", "--save_every=1", "--tag=auto_dtype")
    ckpt = checkpoint_dir("base", "auto_dtype")
    for f in ckpt.glob("*_000003*"):  # as if the run had been stopped after step 2
        f.unlink()
    meta = load_meta(ckpt, 2)
    assert meta["autocast"] == "torch.bfloat16"
    monkeypatch.setattr(common, "cpu_bf16_speedup", lambda: 0.5)  # now it looks slow
    assert common.autocast_dtype("cpu") is None
    assert common.resumed_autocast_dtype(None, "auto", meta["autocast"]) is torch.bfloat16
    assert common.resumed_autocast_dtype(None, "off", meta["autocast"]) is None  # an explicit choice stands
    run_train(tiny_env, "--num_iterations=3", "--save_every=1", "--tag=auto_dtype", "--resume")
    assert load_meta(ckpt, 3)["autocast"] == "torch.bfloat16"


def test_compile_auto_rule(monkeypatch):
    """--compile=auto: always on CUDA; on CPU only for long runs and where inductor's C++ compiler exists."""
    from nanochat.checkpoint import saved_train_config
    from nanochat.common import CPU_COMPILE_MIN_STEPS, use_compile
    monkeypatch.setenv("CXX", sys.executable)  # some executable: a compiler is "there"
    assert use_compile("cuda", "auto", 1) and not use_compile("cpu", "auto", CPU_COMPILE_MIN_STEPS - 1)
    assert use_compile("cpu", "auto", CPU_COMPILE_MIN_STEPS) and not use_compile("mps", "auto", 10_000)
    assert use_compile("cpu", "on", 1) and not use_compile("cuda", "off", 10_000)
    monkeypatch.setenv("CXX", "/no/such/compiler")
    assert not use_compile("cpu", "auto", 10_000)
    with pytest.raises(ValueError, match="--compile"):
        use_compile("cpu", "yes", 1)
    assert saved_train_config({"train_config": {"compile": True}})["compile"] == "auto"  # written before the choices
    assert saved_train_config({"train_config": {"compile": False}})["compile"] == "off"


FAULTS = """
import resource, sys, torch
from nanochat.common import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(16):  # 64 MB, freed: glibc unmaps it unless it keeps freed memory (then a few copies settle in the heap)
    x = torch.ones(2**24); del x
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    x = torch.ones(2**24); del x
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_kept_freed_memory_is_not_page_faulted_again():
    """A training step frees and re-allocates its big activations: with keep_freed_memory (compute_init on CPU)
    they come back from the heap, instead of ~16k page faults per 64 MB re-allocation."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONPATH=os.getcwd()))
        kept, n = out.stdout.split()
        return kept, int(n)
    kept, with_it = faults("keep")
    if kept != "True":
        pytest.skip("no glibc mallopt here")
    _, without = faults("default")
    assert without > 4 * 10_000 and with_it < 1_000


@pytest.mark.skipif(cpu_compiler() is None, reason="inductor needs a C++ compiler")
def test_compiled_training_on_cpu_matches_eager(tiny_env, capsys):
    """--compile=on on CPU trains the torch.compile'd GPT, to the same losses as eager up to float rounding."""
    args = ("--num_iterations=3", "--eval_every=3", "--cpu_bf16=off")
    run_train(tiny_env, *args, "--compile=off", "--tag=eager")
    assert "compile off" in capsys.readouterr().out
    run_train(tiny_env, *args, "--compile=on", "--tag=compiled")
    assert "compile on" in capsys.readouterr().out
    eager, compiled = (load_meta(checkpoint_dir("base", tag), 3) for tag in ("eager", "compiled"))
    assert compiled["train_config"]["compile"] == "on"
    assert eager["history"]["loss"] == pytest.approx(compiled["history"]["loss"], rel=1e-3)
    assert eager["val_bpb"] == pytest.approx(compiled["val_bpb"], rel=1e-3)


def test_bad_flags_and_inputs(tiny_env, tmp_path):
    with pytest.raises(SystemExit, match="total_batch_size"):
        run_train(tiny_env, "--total_batch_size=100")
    with pytest.raises(SystemExit, match="head_dim"):
        run_train(tiny_env, "--width=96")
    with pytest.raises(SystemExit):
        run_train(tiny_env, "--no_such_flag=1")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no .txt"):
        base_train.main([f"--data={empty}", *TINY, "--num_iterations=1"])
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        run_train(tiny_env, "--num_iterations=2", "--tag=never_trained", "--resume")


def test_a_used_tag_is_never_continued_by_accident(tiny_env):
    run_train(tiny_env, "--num_iterations=2", "--tag=reuse")
    with pytest.raises(SystemExit, match="already holds a run.*--resume.*--overwrite"):
        run_train(tiny_env, "--num_iterations=3", "--tag=reuse")
    with pytest.raises(SystemExit, match=r"--resume: .* other flags .*--matrix_lr: 0.02 -> 0.03; --seed: 42 -> 7"):
        run_train(tiny_env, "--num_iterations=2", "--tag=reuse", "--resume", "--matrix_lr=0.03", "--seed=7", "--eval_every=1")
    run_train(tiny_env, "--num_iterations=3", "--tag=reuse", "--overwrite")
    aside = [p for p in checkpoint_dir("base", "reuse").parent.iterdir() if p.name.startswith("reuse.replaced-")]
    assert len(aside) == 1 and (aside[0] / "model_000002.pt").exists()  # the old run is kept, not continued
    assert build_model(checkpoint_dir("base", "reuse"), None, "cpu")[2]["step"] == 3
    assert not (checkpoint_dir("base", "reuse") / "model_000002.pt").exists()


def test_corrupt_checkpoint_is_reported(tiny_env):
    run_train(tiny_env, "--num_iterations=1", "--tag=corrupt")
    ckpt = checkpoint_dir("base", "corrupt")
    model_file = ckpt / "model_000001.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="has changed since it was written"):
        build_model(ckpt, None, "cpu")
    (ckpt / "meta_000001.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        build_model(ckpt, None, "cpu")


def test_missing_tokenizer(tiny_env, tmp_path, monkeypatch):
    monkeypatch.setenv("MC_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match="tok_train"):
        run_train(tiny_env, "--num_iterations=1")


def test_torchrun_two_gloo_ranks(tiny_env):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.base_train", f"--data={tiny_env['data']}", *TINY, "--total_batch_size=512",
           "--num_iterations=2", "--tag=ddp", "--device_type=cpu"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (checkpoint_dir("base", "ddp") / "optim_000002_rank1.pt").exists()
    model, _, meta = build_model(checkpoint_dir("base", "ddp"), None, "cpu")
    assert meta["step"] == 2 and set(meta["sha256"]) == {"model_000002.pt", "optim_000002_rank0.pt", "optim_000002_rank1.pt"}
    rank1 = checkpoint_dir("base", "ddp") / "optim_000002_rank1.pt"
    rank1.write_bytes(rank1.read_bytes()[:-1] + b"x")  # another rank's file changed on disk is refused too
    with pytest.raises(CheckpointError, match="has changed since it was written"):
        load_training_state(checkpoint_dir("base", "ddp"), 2, 1)
