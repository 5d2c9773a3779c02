"""Training on many devices and many processes, against one device.

`tests/train_sharded_cases.py` runs in a subprocess with 8 fake CPU devices (the device count
is fixed when jax starts):
  - 3 train steps (2 micro-batches each) on meshes (data 2, expert 4) and (fsdp 2, expert 2,
    tensor 2) give the losses, params and AdamW moments of 3 steps on one device;
  - the compiled step holds all-to-all; params lie by the rules, moments split by ZeRO-1;
  - a checkpoint saved on one mesh restores onto the other, equal, and training goes on there
    as it goes on on the first;
  - GRPO samples from the state where it lies on (data 2, expert 4), and its update gives the
    samples, log-probs and params of one device.
Here: train.py as two processes (jax.distributed over gloo, 2 CPU devices each) reaches the
losses of one process with 4 devices, on mesh (data 2, expert 2), pretraining and GRPO.
"""

import os
import socket
import subprocess
import sys
import time

import numpy as np
from eight_devices import run_cases
from train_helpers import CACHE, cli_flags, small_config, typed, write_additions

from deepseek_jax.rl import sft
from deepseek_jax.train.metrics import read

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sharded_training_on_eight_devices():
    run_cases("tests/train_sharded_cases.py", expected_passed=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config, devices: int, log: str, *extra: str, file="tiny", **flag_kw):
    """train.py --config `file` in a subprocess with `devices` fake CPU devices, the rest of
    `config` as flags (`flag_kw`: cli_flags' options); stderr to `log`."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    flags = cli_flags(config, **flag_kw)
    with open(log, "w") as err:
        return subprocess.Popen(
            [sys.executable, "train.py", "--config", file, *flags, *extra],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, str], timeout: float) -> None:
    """Waits for every process; on a failure or the timeout kills the rest, shows the log."""
    deadline = time.time() + timeout
    try:
        for name, proc in procs.items():
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                code = "timeout"
            if code != 0:
                with open(logs[name]) as f:
                    raise AssertionError(f"{name}: exit {code}\n{f.read()[-4000:]}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_like_one(configs: dict, tmp_path, **launch_kw) -> None:
    """configs["one process"] on 4 devices beside configs["two processes"] as two processes of
    2 devices each (jax.distributed over gloo on 127.0.0.1)."""
    address = f"127.0.0.1:{free_port()}"
    logs = {name: str(tmp_path / f"{name}.log") for name in ("one", "rank 0", "rank 1")}
    procs = {"one": launch(configs["one process"], 4, logs["one"], **launch_kw)}
    for i in (0, 1):
        procs[f"rank {i}"] = launch(
            configs["two processes"],
            2,
            logs[f"rank {i}"],
            f"--coordinator_address={address}",
            "--num_processes=2",
            f"--process_id={i}",
            **launch_kw,
        )
    wait_all(procs, logs, timeout=600)  # a hang guard; the machine may be shared


def test_two_processes_train_like_one(tmp_path):
    configs = {}
    for name in ("one process", "two processes"):
        config = small_config(tmp_path / name.replace(" ", "_"), steps=4, log_every=1)
        config.train.eval_every = config.train.save_every = 4
        config.mesh.data, config.mesh.expert = 2, 2
        configs[name] = config
    run_like_one(configs, tmp_path)

    one, two = (read(c.train.run_dir) for c in configs.values())
    assert [r["step"] for r in two if r["kind"] == "train"] == [1, 2, 3, 4]
    for key in ("train", "eval"):
        a = [r.get("loss", r.get("eval_loss")) for r in one if r["kind"] == key]
        b = [r.get("loss", r.get("eval_loss")) for r in two if r["kind"] == key]
        np.testing.assert_allclose(b, a, rtol=1e-5)
    assert os.path.isdir(os.path.join(configs["two processes"].train.run_dir, "checkpoints", "4"))


def test_two_processes_grpo_like_one(tmp_path):
    """GRPO as two processes samples the same answers, scores them alike and makes the same
    updates as one process: rollouts are gathered to every host and placed back on the mesh."""
    sys.path.insert(0, ROOT)
    from deepseek_jax.configs import grpo as grpo_config
    from deepseek_jax.configs import sft as sft_config

    narrow = {"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32}
    data = write_additions(tmp_path / "add.jsonl")
    config = sft_config.get_config()
    config.model.update(narrow)
    config.data.path = data
    config.data.holdout_fraction = 0.1
    config.optimizer.warmup_steps = 1
    config.train.update(
        dict(steps=2, batch_size=4, save_every=2, eval_every=2, async_checkpoint=False)
    )
    config.train.update(dict(run_dir=str(tmp_path / "sft"), compilation_cache=CACHE))
    sft.run(typed(config))

    configs = {}
    for name in ("one process", "two processes"):
        config = grpo_config.get_config()
        config.model.update(narrow)
        config.mesh.data, config.mesh.expert = 2, 2
        config.data.path = data
        config.optimizer.warmup_steps = 1
        # No compile cache here: with one, process 0 read its compiled steps from it and reached
        # the first cross-process collective 40 s before process 1, past gloo's 30 s deadline
        # (measured on a loaded 2-core machine).
        config.train.update(dict(steps=2, run_dir=str(tmp_path / name.replace(" ", "_"))))
        config.grpo.update(dict(init_from=str(tmp_path / "sft"), prompts_per_step=4, group_size=4))
        configs[name] = config
    run_like_one(configs, tmp_path, file="grpo", model_keys=tuple(narrow))

    one, two = (read(c.train.run_dir) for c in configs.values())
    assert [r["step"] for r in two if r["kind"] == "train"] == [1, 2]
    for key in ("reward_mean", "response_length", "loss", "kl"):
        a = [r[key] for r in one if r["kind"] == "train"]
        b = [r[key] for r in two if r["kind"] == "train"]
        np.testing.assert_allclose(b, a, atol=1e-5, err_msg=key)
