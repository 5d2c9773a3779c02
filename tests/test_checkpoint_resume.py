"""A run survives what clusters do to it (issue 20):
- killed in the middle of an async save (SIGKILL while orbax writes step 6), it resumes from
  the previous complete step and ends bitwise equal to a straight run, with each step logged
  once in metrics.jsonl and TensorBoard told to purge the replayed steps;
- a save that fails (the disk full, the checkpoint directory gone) stops train.py within
  seconds with one line naming the directory and the cause, the last complete step intact;
- a latest step that does not restore (a truncated params file, a missing data-iterator
  file) is reported in one line, set aside in broken_checkpoints/ and the run resumes from
  the step before."""

import glob
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from train_helpers import cli_flags, small_config, typed

from deepseek_jax.checkpoint.orbax import BROKEN, load_params, make_manager
from deepseek_jax.train.loop import run
from deepseek_jax.train.metrics import read

ROOT = os.path.join(os.path.dirname(__file__), "..")


def launch(config) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", "--config", "tiny", *cli_flags(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(proc: subprocess.Popen, path: str, timeout: float = 240) -> None:
    """Polls until `path` exists (train.py still running)."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited early:\n{proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, f"no {path} within {timeout} s"
        time.sleep(0.001)


def tensorboard_events(run_dir: str) -> list:
    """Every event of the run's TensorBoard files (TFRecord: length, crc, event, crc)."""
    events = []
    for path in sorted(glob.glob(os.path.join(run_dir, "tb", "events.*"))):
        with open(path, "rb") as f:
            data = f.read()
        at = 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            events.append(event_pb2.Event.FromString(data[at + 12 : at + 12 + length]))
            at += 12 + length + 4
    return events


def test_killed_mid_save_resumes_from_the_step_before_bitwise_and_logs_each_step_once(
    tmp_path,
):
    # Evaluating every step widens the window between checkpoints for the kill.
    settings = dict(save_every=3, log_every=1, eval_every=1, eval_batches=4)
    straight = small_config(tmp_path / "a", **settings)
    run(typed(straight))

    resumed = small_config(tmp_path / "b", **settings)
    checkpoints = os.path.join(resumed.train.run_dir, "checkpoints")
    proc = launch(resumed)
    wait_for(proc, os.path.join(checkpoints, "6.orbax-checkpoint-tmp"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(checkpoints, "6")), "the save of step 6 completed"
    manager = make_manager(resumed.train.run_dir, keep=3)
    assert manager.latest_step() == 3
    manager.close()
    assert max(r["step"] for r in read(resumed.train.run_dir)) > 3  # steps the resume replays
    run(typed(resumed))

    _, a = load_params(straight.train.run_dir)
    _, b = load_params(resumed.train.run_dir)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    for kind in ("train", "eval"):
        once = [r for r in read(resumed.train.run_dir) if r["kind"] == kind]
        assert [r["step"] for r in once] == list(range(1, 13))
        key = "loss" if kind == "train" else "eval_loss"
        expected = [r[key] for r in read(straight.train.run_dir) if r["kind"] == kind]
        assert [r[key] for r in once] == expected
    starts = [
        e.step for e in tensorboard_events(resumed.train.run_dir) if e.HasField("session_log")
    ]
    assert starts == [4]  # TensorBoard hides the killed run's events from step 4 on


def failed_save(tmp_path, fault: str) -> tuple[subprocess.Popen, str, str]:
    """Starts train.py (async saves every 2 steps), injects `fault` once step 2 is complete,
    returns the process, its checkpoint directory and the complete step's directory."""
    config = small_config(tmp_path, steps=40, save_every=2, eval_every=100, log_every=1)
    checkpoints = os.path.join(config.train.run_dir, "checkpoints")
    proc = launch(config)
    wait_for(proc, os.path.join(checkpoints, "2"))
    kept = os.path.join(checkpoints, "2")
    if fault == "disk full":
        # Writes past the limit fail with EFBIG as on a full disk (Python ignores SIGXFSZ).
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (200_000, 200_000))
    else:  # the directory is gone, a file in its place: its mkdir fails as on a read-only one
        os.rename(checkpoints, checkpoints + ".kept")
        open(checkpoints, "w").close()
        kept = os.path.join(checkpoints + ".kept", "2")
    return proc, checkpoints, kept


@pytest.mark.parametrize("fault", ["disk full", "directory gone"])
def test_a_failed_save_stops_the_run_in_one_line(tmp_path, fault):
    proc, checkpoints, kept = failed_save(tmp_path, fault)
    start = time.time()
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 2, stderr[-3000:]
    assert time.time() - start < 60
    lines = [x for x in stderr.replace("\r", "\n").splitlines() if x and not x.startswith("train:")]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(
        f"deepseek-jax-train: could not save checkpoint step 4 in {checkpoints} ("
    )
    assert ("File too large" if fault == "disk full" else "Not a directory") in lines[0]
    assert "the last complete checkpoint is step 2" in lines[0]
    os.makedirs(tmp_path / "kept" / "checkpoints")
    shutil.move(kept, tmp_path / "kept" / "checkpoints" / "2")
    shutil.copy(os.path.join(tmp_path, "run", "model_config.json"), tmp_path / "kept")
    _, params = load_params(tmp_path / "kept")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def break_params(step_dir: str) -> None:
    """Truncates the largest params data file to half its size."""
    files = glob.glob(os.path.join(step_dir, "params", "**", "d", "*"), recursive=True)
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)


def remove_data_state(step_dir: str) -> None:
    """Deletes the saved data-iterator position."""
    for path in glob.glob(os.path.join(step_dir, "data", "*")):
        os.remove(path)


def test_a_step_that_does_not_restore_is_set_aside_and_the_one_before_used(tmp_path, capsys):
    config = small_config(tmp_path, steps=4, save_every=2, eval_every=100, log_every=1)
    config.train.async_checkpoint = False
    run(typed(config))
    checkpoints = os.path.join(config.train.run_dir, "checkpoints")
    for damage, step, steps in ((break_params, 4, 6), (remove_data_state, 6, 8)):
        damage(os.path.join(checkpoints, str(step)))
        capsys.readouterr()
        config.train.steps = steps
        run(typed(config))
        out = capsys.readouterr().out
        lines = [x for x in out.splitlines() if "does not restore" in x]
        assert len(lines) == 1, out
        assert lines[0].startswith(f"checkpoint step {step} in {checkpoints} does not restore (")
        assert f"resumed {config.train.run_dir} at step {step - 2}" in out
        assert os.path.isdir(os.path.join(checkpoints, BROKEN, str(step)))  # kept, set aside
    assert sorted(os.listdir(checkpoints)) == ["4", "6", "8", BROKEN]  # keep=3
    train = [r["step"] for r in read(config.train.run_dir) if r["kind"] == "train"]
    assert train == list(range(1, 9))
