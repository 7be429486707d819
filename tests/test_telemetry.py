"""MC step telemetry: metrics averaged over a step's micro-batches, phase seconds summed, one log line."""

from mc.telemetry import NoTelemetry, PhaseTimer, StepTelemetry

KEYS = ["lm_loss", "lens_loss", "lens_hit", "nll_h_truncation", "nll_h_variants", "nll_h_best", "dnll_abs", "expansions",
        "lod0_share", "lod1_share"]


def test_step_telemetry_averages_micro_batches_and_sums_phases():
    telemetry = StepTelemetry(PhaseTimer("cpu"))
    for value in (1.0, 3.0):  # two micro-batches
        with telemetry.phase("forward"):
            sum(range(10_000))
        telemetry.add({key: value for key in KEYS}, 2)
    with telemetry.phase("optimizer"):
        sum(range(10_000))
    telemetry.collect()
    assert telemetry.metrics == {key: 2.0 for key in KEYS}
    assert set(telemetry.times) == {"forward", "optimizer"} and all(s > 0 for s in telemetry.times.values())
    line = telemetry.log_line(step_seconds=10.0)
    assert "lm 2.000" in line and "hit 2.00" in line and "lod mix 2.00/2.00" in line and "optimizer 0%" in line
    logged = telemetry.wandb()
    assert logged["mc/lm_loss"] == 2.0 and logged["mc_time/forward"] == telemetry.times["forward"]
    telemetry.reset()
    assert telemetry.metrics == {} and telemetry.times == {} and telemetry.wandb() == {}


def test_plain_training_has_no_telemetry():
    telemetry = NoTelemetry()
    with telemetry.phase("backward"):
        telemetry.add({"lm_loss": 1.0}, 1)
    telemetry.collect()
    assert telemetry.log_line(1.0) == "" and telemetry.wandb() == {}
