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
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp

from deepseek_jax.checkpoint.hf import copy_tokenizer_files
from deepseek_jax.config import ModelConfig
from deepseek_jax.errors import UserError
from deepseek_jax.model.transformer import init_params

MODEL_CONFIG = "model_config.json"
RUN_INFO = "run.json"
CHECKPOINTS = "checkpoints"


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
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
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
