"""Runs a cases module (not collected by the main suite) in a pytest subprocess that sees 8 fake
CPU devices: the device count is fixed when jax starts, so it cannot change in-process."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cases(path: str, expected_passed: int, devices: int = 8) -> None:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", path],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert f"{expected_passed} passed" in run.stdout, run.stdout[-3000:]
