"""base_train --mc end to end: training, checkpoint contents, exact resume, flag errors, torchrun.

Tiny model (depth 1, width 64, T=64) and tiny MegaContext (K=8, W=32, R=16, H=8, N=3): one sequence
per MC micro-batch, (1+3) x 32 = 2 x 64 entries, the same as the plain micro-batch, so each step of
128 tokens is two MC micro-batches.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from mc.build import load_controller
from nanochat.checkpoint import build_model, checkpoint_dir, load_module_states
from nanochat.common import cpu_compiler, get_report_dir
from scripts import base_train

TINY = ["--depth=1", "--width=64", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=128",
        "--eval_tokens=128", "--log_every=1", "--sample_every=-1"]
MC = ["--mc", "--mc_block_size=8", "--mc_wc_budget=32", "--mc_recent=16", "--mc_horizon=8", "--mc_num_variants=3",
      "--mc_gist_layers=1", "--mc_lens_layers=1", "--mc_lens_width=32"]


def run_train(tiny_env, *extra, mc=True):
    return base_train.main([f"--data={tiny_env['data']}", *TINY, *(MC if mc else []), *extra])


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mc_trains_and_checkpoint_restores_the_nets(tiny_env, capsys):
    run_train(tiny_env, "--num_iterations=2", "--tag=mc_smoke")
    out = capsys.readouterr().out
    assert "MegaContext: micro-batch 1 sequences x 4 variants = 4 working contexts of W=32" in out
    section = (get_report_dir() / "section-base-mc-train.md").read_text()  # its own section: a plain run keeps its own
    assert "Base model training with MegaContext" in section and "final last-H bpb (mc, W=32)" in section
    assert (get_report_dir() / "base_mc_val_bpb.png").exists()
    ckpt = checkpoint_dir("base", "mc_smoke")
    model, states, meta = build_model(ckpt, None, "cpu")
    assert meta["step"] == 2 and {"gpt", "mc_gist", "mc_lens"} <= set(states)
    assert meta["mc_config"]["block_size"] == 8 and meta["mc_config"]["wc_budget"] == 32
    assert all(len(meta["history"][f"val_{arm}"]) == 2 for arm in ("truncation", "mc", "full"))
    assert all(v == v for v in meta["history"]["loss"])
    assert states["mc_lens"]["score_w"].abs().sum() > 0, "LensNet trained (its score vector starts at zero)"
    controller = load_controller(model, states, meta)
    assert states_equal(controller.gistnet.state_dict(), states["mc_gist"])
    assert states_equal(controller.lensnet.state_dict(), states["mc_lens"])
    assert controller.cfg.num_variants == 3 and controller.model is model


@pytest.mark.skipif(cpu_compiler() is None, reason="inductor needs a C++ compiler")
def test_mc_compiled_matches_eager(tiny_env):
    """--compile=on: the controller drives the torch.compile'd GPT (working contexts and the history LM) to the same
    losses as eager up to float rounding."""
    args = ("--num_iterations=2", "--eval_every=2", "--cpu_bf16=off", "--history_lm_weight=1")
    run_train(tiny_env, *args, "--compile=off", "--tag=mc_eager")
    run_train(tiny_env, *args, "--compile=on", "--tag=mc_compiled")
    eager, compiled = (build_model(checkpoint_dir("base", tag), None, "cpu")[2] for tag in ("mc_eager", "mc_compiled"))
    assert eager["history"]["loss"] == pytest.approx(compiled["history"]["loss"], rel=1e-3)


def resume_from(tiny_env, full_tag, part_tag, step, *args):
    """Copy step `step` of run full_tag into part_tag and resume it there with the same args."""
    full_dir, part_dir = checkpoint_dir("base", full_tag), checkpoint_dir("base", part_tag)
    part_dir.mkdir(parents=True, exist_ok=True)
    for f in full_dir.glob(f"*_{step:06d}*"):
        shutil.copy(f, part_dir / f.name)
    run_train(tiny_env, *args, f"--tag={part_tag}", "--resume")
    return full_dir, part_dir


def test_mc_resume_is_exact(tiny_env):
    run_train(tiny_env, "--num_iterations=4", "--save_every=2", "--tag=mc_full")
    full_dir, part_dir = resume_from(tiny_env, "mc_full", "mc_part", 2, "--num_iterations=4", "--save_every=2")
    a, b = load_module_states(full_dir, 4), load_module_states(part_dir, 4)
    for name in ("gpt", "mc_gist", "mc_lens"):
        assert states_equal(a[name], b[name]), name
    # and training moved them: step 4 differs from step 2
    assert not states_equal(a["mc_gist"], load_module_states(full_dir, 2)["mc_gist"])
    # resuming with other MegaContext flags than the checkpoint's is refused
    with pytest.raises(SystemExit, match="--resume: .* MegaContext config"):
        run_train(tiny_env, "--num_iterations=4", "--tag=mc_part", "--resume", "--mc_horizon=4")


def test_mc_flag_errors(tiny_env, capsys):
    with pytest.raises(SystemExit):
        run_train(tiny_env, "--num_iterations=1", "--mc_wc_budget=32", mc=False)
    assert "--mc_* flags were given without --mc" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--mc_wc_budget=12 must be at least 2 x --mc_block_size=8"):
        run_train(tiny_env, "--num_iterations=1", "--mc_wc_budget=12")
    with pytest.raises(SystemExit, match="--max_seq_len=64 must exceed --mc_wc_budget=64"):
        run_train(tiny_env, "--num_iterations=1", "--mc_wc_budget=64")
    with pytest.raises(SystemExit, match="--mc_num_variants=1"):
        run_train(tiny_env, "--num_iterations=1", "--mc_num_variants=1")
    with pytest.raises(SystemExit):  # an unknown mode is rejected by the flag's choices
        run_train(tiny_env, "--num_iterations=1", "--mc_positional=spiral")
    assert "--mc_positional" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--history_lm_weight=0.5: .* only with --mc"):
        run_train(tiny_env, "--num_iterations=1", "--history_lm_weight=0.5", mc=False)
    with pytest.raises(SystemExit, match="--history_lm_weight=0.5 trains only the GPT"):
        run_train(tiny_env, "--num_iterations=1", "--history_lm_weight=0.5", "--freeze=gpt")
    with pytest.raises(SystemExit, match="bag_loss_weight"):
        run_train(tiny_env, "--num_iterations=1", "--mc_bag_loss_weight=-1")
    with pytest.raises(SystemExit, match="--mc_max_distance=16 must be 0"):
        run_train(tiny_env, "--num_iterations=1", "--mc_max_distance=16")


def test_mc_torchrun_two_gloo_ranks(tiny_env):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.base_train", f"--data={tiny_env['data']}", *TINY, *MC, "--total_batch_size=256", "--eval_tokens=256",
           "--num_iterations=2", "--tag=mc_ddp", "--device_type=cpu"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-8000:]
    ckpt = checkpoint_dir("base", "mc_ddp")
    assert (ckpt / "optim_000002_rank0.pt").exists() and (ckpt / "optim_000002_rank1.pt").exists()
    model, states, meta = build_model(ckpt, None, "cpu")
    assert meta["step"] == 2 and {"mc_gist", "mc_lens"} <= set(states)
    load_controller(model, states, meta)


def test_init_from_a_plain_checkpoint(tiny_env, capsys):
    """--init_from: an --mc run (here with a longer --max_seq_len) starts from a plain model's GPT weights."""
    base_train.main([f"--data={tiny_env['data']}", *TINY[:2], "--max_seq_len=32", "--device_batch_size=2",
                     "--total_batch_size=64", "--eval_tokens=64", "--sample_every=-1", "--num_iterations=2",
                     "--tag=plain_init"])
    run_train(tiny_env, "--num_iterations=1", "--init_from=plain_init", "--tag=mc_init", "--freeze=gpt")  # MC nets train
    assert "initialised the GPT from" in capsys.readouterr().out
    source, started = (load_module_states(checkpoint_dir("base", t), s) for t, s in (("plain_init", 2), ("mc_init", 1)))
    assert states_equal(source["gpt"], started["gpt"])
    with pytest.raises(SystemExit, match="only --max_seq_len may differ"):
        run_train(tiny_env, "--num_iterations=1", "--init_from=plain_init", "--tag=mc_init2", "--width=128")
    with pytest.raises(SystemExit, match="give one of them"):
        run_train(tiny_env, "--num_iterations=1", "--init_from=plain_init", "--resume", "--tag=mc_init")
    with pytest.raises(SystemExit, match="leaves nothing to train"):
        run_train(tiny_env, "--num_iterations=1", "--freeze=gpt,mc_gist,mc_lens", "--tag=mc_init3")
    with pytest.raises(SystemExit, match="can freeze only gpt, mc_gist, mc_lens"):
        run_train(tiny_env, "--num_iterations=1", "--freeze=gpt,lm_head", "--tag=mc_init3")


def test_gistnet_on_adamw_resumes_exactly_also_without_muon(tiny_env):
    """--mc_gist_optimizer=adamw: GistNet's matrices train by AdamW (LensNet's and the GPT's by Muon); the run resumes
    exactly, and so does a phase in which GistNet alone trains (GPT and LensNet frozen: no matrix left for Muon)."""
    adam = "--mc_gist_optimizer=adamw"
    run_train(tiny_env, "--num_iterations=4", "--save_every=2", adam, "--tag=mc_adam")
    full_dir, part_dir = resume_from(tiny_env, "mc_adam", "mc_adam_part", 2, "--num_iterations=4", "--save_every=2", adam)
    a, b = load_module_states(full_dir, 4), load_module_states(part_dir, 4)
    assert all(states_equal(a[name], b[name]) for name in ("gpt", "mc_gist", "mc_lens"))
    assert not states_equal(a["mc_gist"], load_module_states(full_dir, 2)["mc_gist"])
    gist_only = ("--num_iterations=2", "--save_every=1", adam, "--freeze=gpt,mc_lens")
    run_train(tiny_env, *gist_only, "--init_from=mc_adam", "--tag=mc_adam_gist")
    full_dir, part_dir = resume_from(tiny_env, "mc_adam_gist", "mc_adam_gist_part", 1, *gist_only)
    a, b = load_module_states(full_dir, 2), load_module_states(part_dir, 2)
    assert all(states_equal(a[name], b[name]) for name in ("gpt", "mc_gist", "mc_lens"))
    assert not states_equal(a["mc_gist"], load_module_states(checkpoint_dir("base", "mc_adam"), 4)["mc_gist"])


def test_focus_phase_from_an_mc_checkpoint_with_the_bag_loss(tiny_env, capsys):
    """MC training with GistNet's bag loss, then a focus phase (--init_from it, GPT and GistNet frozen): the nets
    load from the checkpoint, only LensNet changes, and the bag head travels with GistNet."""
    bag, nomatch = "--mc_bag_loss_weight=0.5", "--no-mc_lens_match"
    run_train(tiny_env, "--num_iterations=2", bag, nomatch, "--tag=mc_bag")
    assert "| bag " in capsys.readouterr().out
    # another training setting (distances kept below 32, half the GPT's T=64) does not change the nets: they load
    run_train(tiny_env, "--num_iterations=2", bag, nomatch, "--mc_max_distance=32", "--init_from=mc_bag",
              "--freeze=gpt,mc_gist", "--tag=mc_bag_focus")
    assert "initialised GistNet and LensNet from" in capsys.readouterr().out
    source, focused = load_module_states(checkpoint_dir("base", "mc_bag"), 2), load_module_states(checkpoint_dir("base", "mc_bag_focus"), 2)
    assert "bag_head.weight" in focused["mc_gist"]
    assert states_equal(source["gpt"], focused["gpt"]) and states_equal(source["mc_gist"], focused["mc_gist"])
    assert not states_equal(source["mc_lens"], focused["mc_lens"])
    run_train(tiny_env, "--num_iterations=1", nomatch, "--init_from=mc_bag", "--tag=mc_nobag")  # other --mc_* flags: fresh nets
    out = capsys.readouterr().out
    assert "initialised GistNet and LensNet" not in out and "start fresh" in out and "(bag_head)" in out
    # a focus phase that adds LensNet's question match: GistNet and LensNet's body load, the match starts fresh and trains
    run_train(tiny_env, "--num_iterations=2", bag, "--mc_lens_match", "--init_from=mc_bag", "--freeze=gpt,mc_gist",
              "--tag=mc_match_focus")
    assert "question match (--mc_lens_match) starts fresh" in capsys.readouterr().out
    matched = load_module_states(checkpoint_dir("base", "mc_match_focus"), 2)
    assert states_equal(source["mc_gist"], matched["mc_gist"]) and "match_proj.weight" in matched["mc_lens"]
    assert float(matched["mc_lens"]["match_scale"].abs().sum()) > 0, "the match trained"


def test_mc_trains_a_gpt_with_every_model_option(tiny_env):
    """The nanochat model options through MegaContext training and validation: value embeddings read the tokens of
    raw entries (gists have none), windows count entries; the checkpoint keeps the options and trained tables."""
    run_train(tiny_env, "--num_iterations=2", "--tag=mc_options", "--value_embeds", "--layer_scalars", "--backout",
              "--window_pattern=SL")
    model, states, meta = build_model(checkpoint_dir("base", "mc_options"), None, "cpu")
    assert meta["model_config"]["value_embeds"] and meta["model_config"]["window_pattern"] == "SL"
    assert all(v == v for v in meta["history"]["loss"]) and all(v == v for v in meta["history"]["val_mc"])
    assert states["gpt"]["value_embeds.0.weight"].abs().sum() > 0, "the zero-initialised table trained"
