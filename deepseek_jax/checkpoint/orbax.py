"""Orbax checkpoints of a training run, and loading their params for sampling.

A run directory written by train.py:

    model_config.json      ModelConfig.to_dict(): enough to rebuild the model
    run.json               {"tokenizer": ...}: how to turn ids back into text
    tokenizer.json, ...    copies of an HF tokenizer's files, chat template and
                           generation_config.json (none for the byte tokenizer)
    train_config.json      the whole ml-collections config of the run
    checkpoints/<step>/    params, opt_state, meta (step, rng), data (grain iterator state)

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save leaves no step that `latest_step` would return: a half-written checkpoint is
never loaded.

`Checkpoints` is how a training run uses them: every wait on orbax is bounded and every
failure of its background writer becomes one `CheckpointError` line naming the directory and
the cause; resume takes the newest step that restores completely and sets broken ones aside
in `broken_checkpoints/` (kept, never deleted).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from deepseek_jax.checkpoint.hf import copy_tokenizer_files
from deepseek_jax.config import ModelConfig
from deepseek_jax.errors import UserError, debugging
from deepseek_jax.model.transformer import init_params

MODEL_CONFIG = "model_config.json"
RUN_INFO = "run.json"
CHECKPOINTS = "checkpoints"
BROKEN = "broken_checkpoints"


def write_run_info(run_dir: str, cfg: ModelConfig, tokenizer: str, train_config: dict) -> None:
    os.makedirs(run_dir, exist_ok=True)
    for name, data in (
        (MODEL_CONFIG, cfg.to_dict()),
        (RUN_INFO, {"tokenizer": tokenizer}),
        ("train_config.json", train_config),
    ):
        with open(os.path.join(run_dir, name), "w") as f:
            json.dump(data, f, indent=1)
    if tokenizer != "byte":  # sample.py and the HF export read the tokenizer from here
        copy_tokenizer_files(tokenizer, run_dir)


def read_model_config(run_dir: str) -> ModelConfig:
    path = os.path.join(run_dir, MODEL_CONFIG)
    if not os.path.exists(path):
        raise UserError(
            f"{run_dir}: no config.json (HF) or {MODEL_CONFIG} (train.py run): give a checkpoint"
            " directory, a run directory or a hub id"
        )
    with open(path) as f:
        return ModelConfig.from_dict(json.load(f))


def read_tokenizer_name(run_dir: str) -> str:
    with open(os.path.join(run_dir, RUN_INFO)) as f:
        return json.load(f)["tokenizer"]


def make_manager(run_dir: str, keep: int, use_async: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=use_async,
        # Leftovers of a save that was killed: never loaded, so clear them away.
        cleanup_tmp_directories=True,
    )
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "meta": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
    }
    directory = os.path.abspath(os.path.join(run_dir, CHECKPOINTS))
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, state, data_iterator) -> None:
    """Starts saving `state` (a TrainState) and the iterator's position; returns at once."""
    step = int(state.step)
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        ),
    )


def abstract(tree):
    """Shapes, dtypes and shardings of a tree of arrays: where orbax restores onto."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore(manager: ocp.CheckpointManager, state, data_iterator, step: int | None = None):
    """The saved TrainState placed like `state`; sets `data_iterator` to its saved position."""
    step = manager.latest_step() if step is None else step
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(state.params)),
            opt_state=ocp.args.StandardRestore(abstract(state.opt_state)),
            meta=ocp.args.StandardRestore(abstract({"step": state.step, "rng": state.rng})),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ),
    )
    return state.replace(
        step=restored.meta["step"],
        params=restored.params,
        opt_state=restored.opt_state,
        rng=restored.meta["rng"],
    )


def save_params(
    directory: str | os.PathLike, cfg: ModelConfig, params: dict, tokenizer: str = "byte"
) -> None:
    """Writes params alone as step 0 of a run directory that `load_params`, sample.py and
    `dj.load_checkpoint` read (the convert CLI's orbax format). `tokenizer`: "byte" or an HF
    checkpoint dir whose tokenizer files are copied beside the params."""
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, MODEL_CONFIG), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    with open(os.path.join(directory, RUN_INFO), "w") as f:
        json.dump({"tokenizer": tokenizer}, f, indent=1)
    if tokenizer != "byte":
        copy_tokenizer_files(tokenizer, directory)
    manager = ocp.CheckpointManager(
        os.path.join(directory, CHECKPOINTS),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
        item_handlers={"params": ocp.StandardCheckpointHandler()},
    )
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    manager.wait_until_finished()
    manager.close()


def load_params(
    directory: str,
    step: int | None = None,
    shardings: dict | None = None,
    dtype: str | None = None,
) -> tuple[ModelConfig, dict]:
    """(cfg, params) of a train.py run directory: its latest complete step unless `step`.
    With `shardings` (a params tree of them) each process reads only its own devices' shards,
    as a job of several processes must; without, the params land on the default device.
    dtype: the params' dtype (cast on restore); None keeps the saved one."""
    directory = os.fspath(directory)
    cfg = read_model_config(directory)
    checkpoints = os.path.abspath(os.path.join(directory, CHECKPOINTS))
    if not os.path.isdir(checkpoints):
        raise UserError(f"{directory}: no {CHECKPOINTS}/ folder: the run has not saved yet")
    manager = ocp.CheckpointManager(
        checkpoints,
        options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False),
        item_handlers={"params": ocp.StandardCheckpointHandler()},
    )
    steps = manager.all_steps()
    step = manager.latest_step() if step is None else step
    if step is None or step not in steps:
        raise UserError(
            f"{directory} holds no complete step {'' if step is None else step} (complete: "
            f"{sorted(steps)}): train until a save, or name one of those steps"
        )
    if dtype is not None:  # the compute dtype stays the run's ("auto": per platform)
        cfg = cfg.replace(param_dtype=dtype)
    target = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    if shardings is not None:
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings
        )
    restored = manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
    )
    manager.close()
    return cfg, restored.params


class CheckpointError(UserError):
    """A checkpoint that could not be written or read; the message is one line with the fix."""


def one_line(error: BaseException | str) -> str:
    """An exception as `Type: first line`, without tensorstore's spec dump (hundreds of chars
    of JSON that name no file the user does not already see in the message)."""
    text = str(error).split(" [tensorstore_spec=")[0].strip().splitlines()
    text = text[0] if text else ""
    return text if isinstance(error, str) else f"{type(error).__name__}: {text}"


class OrbaxErrors(logging.Filter):
    """Keeps the first error orbax logs, and keeps its traceback off the terminal.

    Orbax 0.12's background writers report some failures only by logging them: a step
    directory that cannot be created leaves the save waiting on a signal that never comes
    (measured: forever), and a failed commit is logged before it is raised at the next save.
    The log record is the earliest and sometimes the only word of the cause."""

    def __init__(self):
        super().__init__()
        self.error: BaseException | str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if self.error is None:
            self.error = record.exc_info[1] if record.exc_info else record.getMessage()
        return debugging()


class Checkpoints:
    """A run's checkpoints, for a loop that must never hang on them.

        checkpoints = Checkpoints(run_dir, keep=3)
        state = checkpoints.restore_latest(state, data_iterator) or state
        checkpoints.save(state, data_iterator)   # async: returns once the arrays are copied
        checkpoints.check()                      # each step: raises if a background save failed
        checkpoints.close()

    Every call into orbax runs in a worker thread that the caller joins with a bound
    (`timeout_s`), watching for the errors orbax logs; a failure raises `CheckpointError`
    naming the directory and the cause, and leaves the last complete step untouched.
    """

    def __init__(self, run_dir: str, keep: int, use_async: bool = True, timeout_s: float = 1800):
        self.directory = os.path.abspath(os.path.join(run_dir, CHECKPOINTS))
        self.timeout_s = timeout_s
        self.use_async = use_async
        self.errors = OrbaxErrors()
        logging.getLogger("absl").addFilter(self.errors)
        self.unraisablehook = sys.unraisablehook
        sys.unraisablehook = self.quiet_hook
        self.manager = make_manager(run_dir, keep, use_async)
        self.complete = self.manager.latest_step()  # the newest step known to be whole
        self.pending: int | None = None  # a step whose async save has not been confirmed
        self.failed = False

    def quiet_hook(self, unraisable) -> None:
        """After a failed save, tensorstore's pending writes call back into orbax's asyncio loop,
        already closed, and print each RuntimeError as unraisable (measured: up to 50 tracebacks
        per failure): noise after the fact, the cause is in hand."""
        quiet = isinstance(unraisable.exc_value, RuntimeError) and not debugging()
        if not (quiet and str(unraisable.exc_value) == "Event loop is closed"):
            self.unraisablehook(unraisable)

    def restore_latest(self, state, data_iterator, report: Callable[[str], None] = print):
        """The newest step that restores completely (None if there is no step); newer steps that
        fail to restore are reported in one line each and moved to `broken_checkpoints/`."""
        broken, first_error = [], None
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = restore(self.manager, state, data_iterator, step)
            except Exception as e:  # noqa: BLE001  (any failure to read a step means: skip it)
                first_error = first_error or e
                broken.append(step)
                report(
                    f"checkpoint step {step} in {self.directory} does not restore "
                    f"({one_line(e)}): skipped, kept in {os.path.join(self.directory, BROKEN)}"
                )
                continue
            self.set_aside(broken)
            self.complete = step
            self.errors.error = None  # what orbax logged while failing to read is not a save's
            return restored
        if broken:
            raise CheckpointError(
                f"no checkpoint in {self.directory} restores (the newest, step {broken[0]}: "
                f"{one_line(first_error)}): if the model or optimizer config changed, train in a "
                "new train.run_dir; otherwise remove the broken steps to start afresh"
            )
        return None

    def set_aside(self, steps: list[int]) -> None:
        """Moves broken steps out of orbax's sight (it would refuse to save their step number
        again), into broken_checkpoints/<step> for inspection."""
        if not steps:
            return
        aside = os.path.join(self.directory, BROKEN)
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target = os.path.join(aside, str(step))
                while os.path.exists(target):  # the same step broken twice: keep both
                    target += "+"
                os.rename(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("deepseek_jax: broken checkpoints set aside")
        self.manager.reload()

    def save(self, state, data_iterator) -> None:
        """Starts saving `state` (a TrainState) and the iterator's position. Waits (bounded) for
        the previous save first, as orbax does, so a failed save stops the run at the next."""
        step = int(state.step)
        self.bounded(
            step if self.pending is None else self.pending, self.manager.wait_until_finished
        )
        if self.pending is not None:
            self.complete, self.pending = self.pending, None
        self.bounded(step, lambda: save(self.manager, state, data_iterator))
        self.pending = step
        if not self.use_async:
            self.complete, self.pending = step, None

    def check(self) -> None:
        """Raises if orbax has logged a failure of the save in flight (a cheap look, no wait)."""
        if self.errors.error is not None:
            self.fail(self.pending, self.errors.error)

    def bounded(self, step: int, call: Callable[[], object]) -> None:
        """Runs `call` in a worker thread; raises CheckpointError if it raises, if orbax logs an
        error meanwhile, or if it is still running after `timeout_s`."""
        outcome: list[BaseException] = []

        def work():
            try:
                call()
            except BaseException as e:  # noqa: BLE001  (handed to the caller's thread)
                outcome.append(e)

        worker = threading.Thread(target=work, name="checkpoint", daemon=True)
        worker.start()
        deadline = time.monotonic() + self.timeout_s
        while worker.is_alive() and self.errors.error is None and time.monotonic() < deadline:
            worker.join(0.05)
        if outcome or self.errors.error is not None:
            self.fail(step, outcome[0] if outcome else self.errors.error)
        if worker.is_alive():
            self.fail(step, f"orbax did not finish within {self.timeout_s:.0f} s")

    def fail(self, step: int | None, cause: BaseException | str):
        self.failed = True
        last = "none" if self.complete is None else f"step {self.complete}"
        error = CheckpointError(
            f"could not save checkpoint step {step} in {self.directory} ({one_line(cause)}); "
            f"stopped, the last complete checkpoint is {last}: free disk space or fix the "
            "directory's permissions, then run again to resume"
        )
        # orbax's and tensorstore's writers go on failing in their threads; an ordinary exit
        # can die in their C++ teardown (SIGABRT after the message, seen with a full disk).
        error.exit_now = True
        raise error

    def close(self) -> None:
        """Waits (bounded) for the save in flight. After a failure it waits for nothing: orbax's
        writer may be blocked for good, and the process must still be able to exit."""
        try:
            if not self.failed:
                self.bounded(self.pending, self.manager.close)
                if self.pending is not None:
                    self.complete, self.pending = self.pending, None
        finally:
            # After a failure, orbax's threads go on failing until the process exits: their
            # logs and callbacks stay quiet (the error has been reported).
            if not self.failed:
                logging.getLogger("absl").removeFilter(self.errors)
                sys.unraisablehook = self.unraisablehook
