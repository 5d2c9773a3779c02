"""Resume is exact: 12 straight steps == 6 steps, SIGKILL, resume to 12 (bitwise params);
a half-written checkpoint is never loaded."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from train_helpers import cli_flags, small_config

from deepseek_jax.checkpoint.orbax import load_params, make_manager
from deepseek_jax.train.loop import run

ROOT = os.path.join(os.path.dirname(__file__), "..")


def kill_after_checkpoint(config, step: int) -> None:
    """Runs train.py in a subprocess and SIGKILLs it once checkpoint `step` is complete."""
    done = os.path.join(config.train.run_dir, "checkpoints", str(step))
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--config", "tiny", *cli_flags(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while not os.path.isdir(done):
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited early:\n{proc.stderr.read().decode()[-3000:]}")
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
    # Evaluating every step widens the window between checkpoints 6 and 12 for the kill.
    straight = small_config(tmp_path / "a", eval_every=1, eval_batches=4)
    run(straight)

    resumed = small_config(tmp_path / "b", eval_every=1, eval_batches=4)
    kill_after_checkpoint(resumed, 6)
    manager = make_manager(resumed.train.run_dir, keep=3)
    assert manager.latest_step() == 6, "the run was not killed between checkpoints 6 and 12"
    manager.close()
    run(resumed)

    _, a = load_params(straight.train.run_dir)
    _, b = load_params(resumed.train.run_dir)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_half_written_checkpoint_is_never_loaded(tmp_path):
    config = small_config(tmp_path, steps=6, eval_every=100)
    run(config)
    checkpoints = os.path.join(config.train.run_dir, "checkpoints")
    # What a save killed mid-write leaves: orbax's temporary directory, never renamed.
    partial = os.path.join(checkpoints, "9.orbax-checkpoint-tmp")
    shutil.copytree(os.path.join(checkpoints, "6"), partial)
    shutil.rmtree(os.path.join(partial, "params"))
    manager = make_manager(config.train.run_dir, keep=3)
    assert manager.latest_step() == 6
    manager.close()
    _, params = load_params(config.train.run_dir)
    assert jax.tree.leaves(params)
