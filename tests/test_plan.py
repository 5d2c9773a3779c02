"""The planner (`python -m deepseek_jax.parallel.plan`): its memory from shapes against the
compiled train step on 8 fake devices (`tests/plan_cases.py`, in a subprocess: the device
count is fixed when jax starts), and the command on a run config."""

import os
import subprocess
import sys

from eight_devices import ROOT, run_cases


def test_planned_memory_is_the_compiled_one_on_eight_devices():
    run_cases("tests/plan_cases.py", expected_passed=2)


def test_plan_takes_a_run_config_and_prints_the_whole_memory():
    """--config v2_lite with an override: the run's batch, accumulation, dtypes and remat
    policy, every part of the memory, on fake devices (no compile)."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepseek_jax.parallel.plan",
            "--config",
            "v2_lite",
            "--mesh",
            "fsdp=8",
            "--config.train.micro_steps=18",
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "batch 4608 x 4096 in 18 micro-batches" in out
    assert "remat dots_with_no_batch_dims_saveable" in out
    for part in ("params (float32)", "adamw moments (float32", "activations saved by remat",
                 "one layer's backward", "logits", "total", "latent cache (B 256, S 4096, bfloat16)"):  # fmt: skip
        assert part in out, part
