"""What every training mode (pretraining, SFT, GRPO) keeps around its steps: the compile cache,
the mesh, the run directory's info files, checkpoints with resume, the metrics log, and a
shutdown that neither hangs nor hides the error that ended the run.

    with RunContext(config.train, config.mesh) as run:     # a RunConfig's; mesh: run.mesh
        state = run.start(cfg, tokenizer, config.to_dict(), state, data_iterator)  # resumed or not
        for step in ...:
            ...
            run.check()                      # a failed background save stops the run here
            run.log.write("train", step, metrics)
            run.save(state, data_iterator)
"""

from __future__ import annotations

import math
import os

import jax
from jax.sharding import Mesh
from tqdm import tqdm

from deepseek_jax.checkpoint import orbax as ckpt
from deepseek_jax.checkpoint import read_weights
from deepseek_jax.config import ModelConfig
from deepseek_jax.errors import UserError
from deepseek_jax.parallel.mesh import MESH_AXES, make_mesh
from deepseek_jax.train.metrics import MetricsLog, Silent
from deepseek_jax.train.settings import MeshSettings, TrainSettings


def train_mesh(settings: MeshSettings) -> Mesh:
    """Mesh axis sizes -> a Mesh over every device of every process; data 0 takes what is left."""
    sizes = {axis: int(getattr(settings, axis)) for axis in MESH_AXES}
    devices = jax.device_count()
    others = math.prod(size for axis, size in sizes.items() if axis != "data")
    if sizes["data"] == 0 and devices % others == 0:
        sizes["data"] = devices // others
    if math.prod(sizes.values()) != devices:
        raise UserError(
            f"config.mesh {sizes} spans {math.prod(sizes.values())} devices, but "
            f"{jax.process_count()} process(es) hold {devices}: set the axis sizes so that "
            f"data x fsdp x expert x tensor = {devices} (--config.mesh.data=0 fills data in)"
        )
    return make_mesh(**sizes)


class RunContext:
    """A run's mesh, checkpoints and metrics; a context manager that closes them."""

    def __init__(self, settings: TrainSettings, mesh: MeshSettings):
        self.settings = settings  # run_dir, keep, async_checkpoint, save_timeout_s, ...
        if settings.compilation_cache:
            folder = os.path.abspath(os.path.expanduser(settings.compilation_cache))
            jax.config.update("jax_compilation_cache_dir", folder)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        self.mesh = train_mesh(mesh)
        # One writer for the files every process would write alike (one filesystem is assumed,
        # as orbax assumes it for the checkpoints).
        self.primary = jax.process_index() == 0
        self.checkpoints: ckpt.Checkpoints | None = None
        self.log: MetricsLog | Silent = Silent()

    def start(
        self,
        cfg: ModelConfig,
        tokenizer: str,
        config: dict,
        state,
        data_iterator,
        updates_per_step: int = 1,
    ):
        """Writes the run's info files, resumes from the newest checkpoint that restores
        (moving the iterator to its position) and opens the metrics log from there on (its
        steps are the loop's: optimizer updates / `updates_per_step`).
        Returns the state to train from."""
        settings = self.settings
        if self.primary:
            ckpt.write_run_info(settings.run_dir, cfg, tokenizer, config)
        self.checkpoints = ckpt.Checkpoints(
            settings.run_dir, settings.keep, settings.async_checkpoint, settings.save_timeout_s
        )
        restored = self.checkpoints.restore_latest(state, data_iterator, report=tqdm.write)
        resumed = None
        if restored is not None:
            state, resumed = restored, int(restored.step) // updates_per_step
            tqdm.write(f"resumed {settings.run_dir} at step {resumed}")
        elif settings.init_from:
            shardings = jax.tree.map(lambda leaf: leaf.sharding, state.params)
            state = state.replace(params=read_weights(settings.init_from, cfg, shardings))
            tqdm.write(f"params from {settings.init_from}")
        if self.primary:
            self.log = MetricsLog(settings.run_dir, resumed)
        return state

    def check(self) -> None:
        """Call once a step: raises CheckpointError as soon as a background save has failed."""
        self.checkpoints.check()

    def save(self, state, data_iterator) -> None:
        self.checkpoints.save(state, data_iterator)

    def latest_step(self) -> int | None:
        """The newest checkpoint: complete, or being written (and waited for on exit)."""
        if self.checkpoints is None:
            return None
        return (
            self.checkpoints.complete
            if self.checkpoints.pending is None
            else self.checkpoints.pending
        )

    def __enter__(self) -> RunContext:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.log.close()
        if self.checkpoints is None:
            return
        if error is None:
            self.checkpoints.close()
            return
        # Leaving on an error: still wait for a save in flight (a NaN stop keeps the last
        # good step), but the error that ended the run is the one to report.
        try:
            self.checkpoints.close()
        except ckpt.CheckpointError as close_error:
            tqdm.write(str(close_error))
