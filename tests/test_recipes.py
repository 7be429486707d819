"""The shell recipes parse, answer --help, reject unknown options in one line and, in --dry-run, print the
commands they would run."""

import subprocess

import pytest

RECIPES = ["run10.sh", "speedrun.sh", "run1000.sh", "tests.sh", "scripts/multi_gpu.sh", "scripts/setup_env.sh",
           ".ci/run"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_bash_syntax(recipe):
    subprocess.run(["bash", "-n", recipe], check=True)


@pytest.mark.parametrize("recipe,expect", [("speedrun.sh", "--depth=20"), ("run1000.sh", "--depth=32")])
def test_multi_gpu_dry_run(recipe, expect):
    out = subprocess.run(["bash", recipe, "--dry-run"], check=True, capture_output=True, text=True).stdout
    assert "torchrun --standalone --nproc_per_node=8 -m scripts.base_train" in out and expect in out


def test_run10_dry_run_cpu_preset():
    out = subprocess.run(["bash", "run10.sh", "--cpu", "--dry-run"], check=True, capture_output=True, text=True).stdout
    for step in ["scripts.tok_train", "scripts.base_train", "scripts.base_eval", "nanochat.report generate"]:
        assert step in out
    assert "--depth=4" in out and "--data=books" in out


@pytest.mark.parametrize("recipe, options", [("run10.sh", ["--mc", "--cpu", "--dry-run"]),
                                             ("speedrun.sh", ["--dry-run", "--help", "NPROC"]),
                                             ("run1000.sh", ["--dry-run", "--help", "NPROC"]),
                                             ("scripts/multi_gpu.sh", ["DEPTH", "SHARDS", "DEVICE_BATCH", "NPROC",
                                                                       "--dry-run", "--help"])])
def test_help_and_unknown_options(recipe, options):
    for flag in ["--help", "-h"]:
        result = subprocess.run(["bash", recipe, flag], capture_output=True, text=True)
        assert result.returncode == 0 and all(option in result.stdout for option in options), result.stdout
        assert "+ " not in result.stdout  # nothing ran
    result = subprocess.run(["bash", recipe, "--dry-run", "--bogus"], capture_output=True, text=True)
    name = recipe.rsplit("/", 1)[-1]
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"{name}: unknown option --bogus (see --help)"]


def test_multi_gpu_needs_its_settings():
    result = subprocess.run(["bash", "scripts/multi_gpu.sh", "--dry-run"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "multi_gpu.sh: DEPTH is not set (use speedrun.sh or run1000.sh, or see --help)"]


def test_run10_mc_dry_run():
    out = subprocess.run(["bash", "run10.sh", "--cpu", "--mc", "--dry-run"], check=True, capture_output=True, text=True).stdout
    lines = out.splitlines()
    train = [line for line in lines if "scripts.base_train" in line]
    tags = [line.rsplit("--tag=", 1)[1] for line in train]
    assert tags == ["copy", "long", "mc_joint", "mc", "plain"]  # copy curriculum, long-range, MC, focus, twin
    copy, long_, mc_train, focus, plain_train = train
    assert "--max_seq_len=256" in copy and "--warmup_mix=copy:1" in copy and "--init_from" not in copy
    assert "--init_from=copy" in long_ and "--max_seq_len=1024" in long_
    assert "--mc " in mc_train and "--init_from=long" in mc_train and "--mc" not in plain_train.replace("--tag=plain", "")
    assert "--init_from=mc_joint" in focus and "--freeze=gpt,mc_gist" in focus and "--mc " in focus
    # the twins differ only in MegaContext (--mc* and the MC model's LM loss over its whole history): same
    # start, data, steps and size
    assert "--history_lm_weight=1" in mc_train and "--history_lm_weight" not in focus
    without_mc = " ".join(word for word in mc_train.split() if not word.startswith(("--mc", "--history_lm_weight")))
    assert without_mc.replace("--tag=mc_joint", "--tag=plain") == plain_train and without_mc != mc_train
    assert any("scripts.mc_eval --mc_tag=mc --plain_tag=plain" in line for line in lines)
    assert any("scripts.mid_train" in line and "--source_tag=mc" in line and "memory" in line for line in lines)
    assert "chat_cli --mc" in out
    # every stage starts a new run: an earlier run10.sh's checkpoints of the same tag are moved aside
    assert all("--overwrite" in line for line in lines if "scripts.base_train" in line or "scripts.mid_train" in line
               or "scripts.chat_sft" in line)
