"""Experiment tracking, traces and logs of the training scripts: a wandb offline run holds the whole config
and the MC metrics, one OpenTelemetry trace per step with child spans per phase, and plain log lines
(step/total, elapsed, ETA, MFU %) when the output is a file."""

import glob
import json
import os
import random
import re
import struct
import subprocess
import sys
import time

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from nanochat import tracing
from nanochat.progress import Progress, format_duration
from scripts import base_train, mid_train

TINY = ["--depth=1", "--width=64", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=128",
        "--eval_tokens=128", "--log_every=1", "--sample_every=-1", "--overwrite"]
MC = ["--mc", "--mc_block_size=8", "--mc_wc_budget=32", "--mc_recent=16", "--mc_horizon=8", "--mc_num_variants=3",
      "--mc_gist_layers=1", "--mc_lens_layers=1", "--mc_lens_width=32"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wandb_records(run_file: str) -> list:
    """The records of a wandb offline run file: a 7-byte header, then a LevelDB-style log (32 KiB blocks of
    chunks with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last) of Record protos."""
    from wandb.proto import wandb_internal_pb2
    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    records, chunk, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def offline_run(wandb_dir) -> tuple[dict, list[dict]]:
    """(config, history rows) of the one offline run under wandb_dir. wandb's service process writes the file
    after `finish()` returns, so it is read once its exit record is there (on a loaded machine that can take a while)."""
    (run_file,) = glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    deadline = time.monotonic() + 120
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_file)) and time.monotonic() < deadline:
        time.sleep(0.5)
    config, history = {}, []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return config, history


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path
    import wandb
    wandb.teardown()  # wandb keeps its settings (WANDB_DIR) process-wide until torn down


def test_wandb_offline_run_holds_config_and_mc_metrics(tiny_env, wandb_offline):
    base_train.main([f"--data={tiny_env['data']}", *TINY, *MC, "--num_iterations=2", "--tag=wandb_mc",
                     "--wandb_run=mc-smoke"])
    config, history = offline_run(wandb_offline)
    assert config["train"]["wandb_run"] == "mc-smoke" and config["train"]["num_iterations"] == 2
    assert config["model"]["n_layer"] == 1 and config["model"]["n_embd"] == 64
    assert config["mc"]["wc_budget"] == 32 and config["mc"]["block_size"] == 8
    steps = [row for row in history if "train/loss" in row]
    assert [row["step"] for row in steps] == [1, 2]
    assert all(row["mc/lens_loss"] == row["mc/lens_loss"] and row["mc_time/tree"] > 0 and row["train/mfu_percent"] > 0
               for row in steps)
    assert [row["step"] for row in history if "val/bpb" in row] == [0, 2]
    assert all("val/h_bpb_mc" in row for row in history if "val/bpb" in row)
    from nanochat.common import get_report_dir
    section = (get_report_dir() / "section-base-mc-train.md").read_text()
    assert "wandb run" in section and str(wandb_offline / "wandb" / "offline-run-") in section


def test_wandb_offline_chat_stage(tiny_env, wandb_offline):
    base_train.main([f"--data={tiny_env['data']}", *TINY, "--max_seq_len=128", "--total_batch_size=256", "--eval_tokens=256",
                     "--num_iterations=2", "--tag=wandb_base"])
    mid_train.main(["--source_tag=wandb_base", "--device_batch_size=2", "--rows_per_step=4", "--num_conversations=24",
                    "--val_conversations=4", "--num_iterations=2", "--eval_every=2", "--tag=wandb_mid", "--overwrite",
                    "--data=identity", "--wandb_run=mid-smoke"])
    config, history = offline_run(wandb_offline)
    assert config["train"]["rows_per_step"] == 4 and config["model"]["sequence_len"] == 128
    assert config["source"]["stage"] == "base"
    assert [row["step"] for row in history if "train/loss" in row] == [1, 2]
    assert [row["step"] for row in history if "val/loss" in row] == [0, 2]


def test_one_trace_per_step_with_phase_spans(tiny_env):
    exporter = InMemorySpanExporter()
    tracing.configure(exporter)
    try:
        base_train.main([f"--data={tiny_env['data']}", *TINY, *MC, "--num_iterations=2", "--tag=traced_mc"])
        spans = exporter.get_finished_spans()
    finally:
        tracing.shutdown()
    steps = sorted((s for s in spans if s.name == "train.step"), key=lambda s: s.attributes["step"])
    assert [s.attributes["step"] for s in steps] == [0, 1, 2]  # two updates, then the final validation
    assert all(s.parent is None and s.attributes["rank"] == 0 and s.attributes["micro_batches"] == 2 for s in steps)
    assert len({s.context.trace_id for s in steps}) == 3, "one trace per step"
    by_id = {s.context.span_id: s for s in spans}

    def children(parent):
        return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]

    first = [s.name for s in children(steps[0])]
    assert first.count("micro_batch") == 2 and "optimizer" in first and "validation" in first
    micro = next(s for s in children(steps[1]) if s.name == "micro_batch")
    assert micro.attributes["variants"] == 4 and micro.attributes["wc_budget"] == 32 and micro.attributes["entries"] == 128
    phases = {s.name for s in children(micro)}
    assert {"mc.tree", "mc.lensnet", "mc.allocator", "mc.wc_build", "mc.forward", "mc.losses", "mc.backward"} <= phases
    assert all(s.context.trace_id == steps[1].context.trace_id for s in children(micro))
    assert "checkpoint" in [s.name for s in children(steps[2])] and "micro_batch" not in [s.name for s in children(steps[2])]
    assert all(s.parent is None or s.parent.span_id in by_id for s in spans), "every parent was exported"


def test_trace_ids_differ_between_seeded_runs():
    """Training seeds Python's random; trace ids must not repeat from one run to the next."""
    ids = []
    for _ in range(2):
        random.seed(42)
        tracing.configure(InMemorySpanExporter())
        with tracing.span("train.step") as span:
            ids.append(span.get_span_context().trace_id)
        tracing.shutdown()
    assert ids[0] != ids[1]


def test_tracing_reads_the_standard_variables(monkeypatch):
    for name in tracing.ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    tracing.shutdown()
    assert tracing.tracer() is None
    with tracing.span("nothing") as span:
        assert span is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-run")
    tracing.shutdown()
    try:
        assert tracing.tracer() is not None
        assert tracing._provider.resource.attributes["service.name"] == "my-run"
    finally:
        tracing._provider._active_span_processor._span_processors = ()  # nothing listens on port 9: drop, don't export
        tracing.shutdown()


def test_progress_lines_have_step_elapsed_and_eta(capsys):
    progress = Progress(total=4, initial=1, desc="t")
    progress.update()
    progress.log("loss 1.0000")
    progress.close()
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r"step +2/4 \| loss 1\.0000 \| elapsed 0:00 \| eta 0:00", line)
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05"
    quiet = Progress(total=2, enabled=False)
    quiet.log("hidden")
    assert capsys.readouterr().out == ""


def test_piped_log_is_plain_lines(tiny_env):
    """Run as a subprocess with stdout and stderr going to a pipe (not a TTY): no bar fragments."""
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", f"--data={tiny_env['data']}", *TINY,
                             "--num_iterations=3", "--tag=piped"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step")]
    assert re.fullmatch(r"step +0/3 \| val bpb [\d.]+ \| elapsed \d+:\d\d \| eta \?", lines[0])
    train = [line for line in lines if "tok/s" in line]
    assert len(train) == 3
    assert all(re.fullmatch(r"step +\d/3 \| loss [\d.]+ \| lr x[\d.]+ \| \d+ ms \| [\d,]+ tok/s \| mfu [\d.]+% \| "
                            r"elapsed \d+:\d\d \| eta \d+:\d\d", line) for line in train), train
