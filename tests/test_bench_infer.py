"""scripts/bench_infer runs end to end on a tiny random model (its figures are measured, never asserted)."""

from scripts import bench_infer


def test_bench_infer_runs_and_reports_every_arm(capsys):
    results = bench_infer.main(["--depth=1", "--vocab_size=256", "--block_size=4", "--wc_budget=16", "--recent=4",
                                "--histories=4,16", "--long_history=0", "--repeats=1", "--decode_tokens=8",
                                "--refocus_interval=4", "--threads=1", "--device_type=cpu"])
    out = capsys.readouterr().out
    for name in ("plain_W", "mc_4W", "full_4W", "mc_16W", "full_16W", "mc_stub_4W"):
        assert results[name] > 0, name
    assert results["append_64W"] > 0
    assert "MC, stub nets" in out and "(ceiling)" in out
    # the stub session really refocused and recomputed entries (a ceiling of a session that never edits would say nothing)
    stub_line = next(line for line in out.splitlines() if line.strip().startswith("MC at 4W, stub nets"))
    assert " 0 refocuses" not in stub_line and " 0 partial recomputes" not in stub_line
