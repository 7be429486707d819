"""The shell recipes parse, answer --help, reject unknown options in one line and, in --dry-run, print the
commands they would run: the multi-GPU recipes' stages in order, each with flags its script accepts."""

import argparse
import importlib
import importlib.util
import os
import shlex
import subprocess

import pytest

from nanochat import chat_train
from nanochat.configurator import dataclass_from_args
from scripts import base_train

RECIPES = ["run10.sh", "speedrun.sh", "run1000.sh", "tests.sh", "scripts/multi_gpu.sh", "scripts/setup_env.sh",
           ".ci/run"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_bash_syntax(recipe):
    subprocess.run(["bash", "-n", recipe], check=True)


def dry_run_commands(recipe: str, *options, nproc: str = "8") -> list[list[str]]:
    """The words of every command the recipe prints in --dry-run."""
    out = subprocess.run(["bash", recipe, "--dry-run", *options], check=True, capture_output=True, text=True,
                         env=dict(os.environ, NPROC=nproc)).stdout
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def stage(words: list[str]) -> str:
    """A command's stage: its module (after -m), with the report's command or chat_eval's --source."""
    if "-m" not in words:  # python -c "from nanochat.dataset import prepare; prepare('fineweb-edu:N')"
        return "prepare" if "prepare;" in words else " ".join(words)
    module, args = words[words.index("-m") + 1], words[words.index("-m") + 2:]
    if module == "nanochat.report":
        return f"{module} {args[0]}"
    if module == "scripts.chat_eval":
        return " ".join([module, *[a for a in args if a.startswith("--source=")]])
    return module


class Parsed(Exception):
    """Raised by the patched parse_args: the flags were accepted, and nothing else runs."""


def parse_flags(module_name: str, argv: list[str], world_size: int, monkeypatch, capsys):
    """Parse argv with the module's own argument parser (its main() up to parse_args) and, for the training
    scripts, check the flag combination for world_size GPUs with the script's own validation."""
    module = importlib.import_module(module_name)
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
        try:
            module.main(argv)
        except Parsed as parsed:
            namespace = parsed.args[0]
        except SystemExit:
            pytest.fail(f"{module_name} rejects {argv}: {capsys.readouterr().err.strip()}")
        else:
            pytest.fail(f"{module_name}.main did not parse its flags")
    if module_name == "scripts.base_train":
        base_train.validate(base_train.parse_args(argv)[0], world_size)  # also the --mc_* without --mc check
    elif module_name in ("scripts.mid_train", "scripts.chat_sft"):
        config = module.MidConfig if module_name == "scripts.mid_train" else module.SFTConfig
        chat_train.validate(dataclass_from_args(config, namespace), world_size)


PLAIN_STAGES = ["nanochat.report reset", "prepare", "scripts.tok_train", "scripts.tok_eval", "scripts.base_train",
                "scripts.base_eval", "scripts.mid_train", "scripts.chat_eval --source=mid", "scripts.chat_sft",
                "scripts.chat_eval --source=sft", "scripts.chat_rl", "scripts.chat_eval --source=rl",
                "nanochat.report generate"]
MC_STAGES = [*PLAIN_STAGES[:4], *["scripts.base_train"] * 5, "scripts.mc_eval", *PLAIN_STAGES[6:]]
TORCHRUN = {"scripts.base_train", "scripts.base_eval", "scripts.mid_train", "scripts.chat_sft", "scripts.chat_rl"}


@pytest.mark.parametrize("recipe, depth, options, nproc", [
    ("speedrun.sh", 20, [], "8"), ("run1000.sh", 32, [], "8"), ("speedrun.sh", 20, ["--mc"], "8"),
    ("run1000.sh", 32, ["--mc"], "8"), ("speedrun.sh", 20, [], "2"), ("run1000.sh", 32, ["--mc"], "4")])
def test_multi_gpu_dry_run(recipe, depth, options, nproc, monkeypatch, capsys):
    commands = dry_run_commands(recipe, *options, nproc=nproc)
    mc = "--mc" in options
    assert [stage(words) for words in commands] == (MC_STAGES if mc else PLAIN_STAGES)
    for words in commands:
        if "-m" in words and words[words.index("-m") + 1] in TORCHRUN:
            assert words[:5] == ["uv", "run", "torchrun", "--standalone", f"--nproc_per_node={nproc}"], words
        elif "-m" in words:
            assert words[:4] == ["uv", "run", "python", "-m"], words
    train = [words for words in commands if stage(words) == "scripts.base_train"]
    assert all(f"--depth={depth}" in words for words in train)
    tag = "mc" if mc else f"d{depth}"
    # each chat stage starts from the model the recipe just trained (--mc: the MC model), evaluated by its tag
    assert all(f"--source_tag={tag}" in words for words in commands if stage(words) in ("scripts.mid_train", "scripts.chat_sft"))
    assert all(f"--tag={tag}" in words for words in commands if stage(words) in ("scripts.base_eval",
               "scripts.chat_eval --source=mid", "scripts.chat_eval --source=sft"))
    if mc:  # run10.sh --mc's stages: copy curriculum, long-range pretraining, MC, focus, the plain twin
        assert [w.split("=")[1] for words in train for w in words if w.startswith("--tag=")] == ["copy", "long", "mc_joint", "mc", "plain"]
        mc_train, plain_train = train[2], train[4]
        without_mc = [w for w in mc_train if not w.startswith(("--mc", "--history_lm_weight"))]
        assert [w.replace("--tag=mc_joint", "--tag=plain") for w in without_mc] == plain_train != mc_train
        assert "--target_param_data_ratio=20" in train[1] and "--max_seq_len=4096" in train[1]
        mc_eval = next(words for words in commands if stage(words) == "scripts.mc_eval")
        assert "--recall_length=8" in mc_eval and "--mc_tag=mc" in mc_eval and "--plain_tag=plain" in mc_eval
    # strong check: every flag of every `-m scripts.X` command is accepted by that script's own argument parser
    # (and the batch arithmetic of the training scripts holds for nproc GPUs)
    # The RL stage (scripts.chat_rl, and chat_eval's --source=rl) is written on another branch (issue 11): until
    # it is merged, its two commands cannot be checked
    rl_merged = importlib.util.find_spec("scripts.chat_rl") is not None
    for words in commands:
        if "-m" not in words or (not rl_merged and stage(words) in ("scripts.chat_rl", "scripts.chat_eval --source=rl")):
            continue
        parse_flags(words[words.index("-m") + 1], words[words.index("-m") + 2:], int(nproc), monkeypatch, capsys)


def test_run10_dry_run_cpu_preset():
    out = subprocess.run(["bash", "run10.sh", "--cpu", "--dry-run"], check=True, capture_output=True, text=True).stdout
    for step in ["scripts.tok_train", "scripts.base_train", "scripts.base_eval", "nanochat.report generate"]:
        assert step in out
    assert "--depth=4" in out and "--data=books" in out


@pytest.mark.parametrize("recipe, options", [("run10.sh", ["--mc", "--cpu", "--dry-run"]),
                                             ("speedrun.sh", ["--mc", "--dry-run", "--help", "NPROC"]),
                                             ("run1000.sh", ["--mc", "--dry-run", "--help", "NPROC"]),
                                             ("scripts/multi_gpu.sh", ["DEPTH", "SHARDS", "DEVICE_BATCH", "NPROC",
                                                                       "--mc", "--dry-run", "--help"])])
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
    history_lm = [word for word in mc_train.split() if word.startswith("--history_lm_weight=")]
    assert len(history_lm) == 1 and float(history_lm[0].split("=")[1]) > 0 and "--history_lm_weight" not in focus
    without_mc = " ".join(word for word in mc_train.split() if not word.startswith(("--mc", "--history_lm_weight")))
    assert without_mc.replace("--tag=mc_joint", "--tag=plain") == plain_train and without_mc != mc_train
    assert any("scripts.mc_eval --mc_tag=mc --plain_tag=plain" in line for line in lines)
    assert any("scripts.mid_train" in line and "--source_tag=mc" in line and "memory" in line for line in lines)
    assert "chat_cli --mc" in out
    # every stage starts a new run: an earlier run10.sh's checkpoints of the same tag are moved aside
    assert all("--overwrite" in line for line in lines if "scripts.base_train" in line or "scripts.mid_train" in line
               or "scripts.chat_sft" in line)
