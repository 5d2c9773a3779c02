"""A run's settings as typed, frozen data: what the library's loops take.

    config = RunConfig(model=preset("tiny"), train=TrainSettings(steps=200, run_dir="runs/x"))
    loop.run(config)            # train.loop, rl.sft and rl.grpo all take a RunConfig

The command line keeps ml-collections (`deepseek_jax/configs/*.py`, `--config.train.steps=5`)
and converts at its edge (`configs.from_config_dict`); each section below is one section of
that ConfigDict, and `configs.base_config` builds the ConfigDict from these defaults, so every
default is stated here once. `cli/fields.py` says what each field means (`--print_config`).
"""

from __future__ import annotations

import dataclasses

from deepseek_jax.config import ModelConfig
from deepseek_jax.data.pipeline import DataSettings
from deepseek_jax.errors import UserError

MODES = ("pretrain", "sft", "grpo")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and the learning-rate schedule (paper 3.2.1 values; train/schedule.py)."""

    learning_rate: float = 2.4e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 2000
    schedule: str = "step"  # step (the paper's) | cosine
    decay_at: tuple[float, ...] = (0.6, 0.9)  # step: fractions of the run's TOKENS
    decay_factor: float = 0.316  # step: the rate is multiplied by it at each point
    final_fraction: float = 0.1  # cosine only: final rate / peak
    clip_norm: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "decay_at", tuple(self.decay_at))


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """Device mesh axis sizes (docs/design.md 5); their product is every device of the job."""

    data: int = 0  # 0: the devices the other axes leave
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The run's length, batch, logging, eval, checkpoints and run directory."""

    steps: int = 10000  # the run's length: steps, or (steps 0) ...
    tokens: int = 0  # ... tokens; train/schedule.py turns them into steps
    batch_size: int = 16  # global, in sequences of data.seq_len (the ramp's last size)
    # Batch ramp (paper 3.2.1, train/schedule.py): ramp_stages sizes from ramp_start up, each
    # for an equal share of ramp_tokens, then batch_size. ramp_start 0: fixed. One compile a size.
    ramp_start: int = 0
    ramp_tokens: int = 0
    ramp_stages: int = 3
    micro_steps: int = 1  # gradient accumulation: batch_size / micro_steps per pass
    seed: int = 0  # params, data order
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 0  # per periodic eval, 0: all; the last eval uses all
    save_every: int = 1000
    keep: int = 3  # checkpoints kept
    async_checkpoint: bool = True
    save_timeout_s: float = 1800.0  # longest wait on one checkpoint call, then stop
    run_dir: str = "runs/default"
    # Start from these weights (HF dir, hub id, or run dir[:step]) instead of a random init;
    # their architecture must be the model's. A run that has saved resumes instead.
    init_from: str = ""
    compilation_cache: str = ""  # a folder: compiled steps are reused across runs
    continues: str = ""  # the stage this config continues (needs init_from), if any


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """GRPO's own settings (configs/grpo.py's defaults; rl/grpo.py)."""

    init_from: str = ""  # the run whose params start the policy and the reference
    init_step: int = -1  # its checkpoint to start from; -1: the latest
    reward: str = "reversed_sum"  # a name in deepseek_jax.rl.rewards.REWARDS
    prompts_per_step: int = 16  # P
    group_size: int = 8  # G
    max_new_tokens: int = 6  # N
    temperature: float = 1.0
    updates: int = 2  # optimizer steps per batch of samples (DeepSeekMath's mu)
    clip_eps: float = 0.2
    kl_coef: float = 0.04


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run reads: the model, and one settings section per concern."""

    mode: str = "pretrain"  # pretrain | sft | grpo: the loop that runs it
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # V2 unless given
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    optimizer: OptimizerSettings = dataclasses.field(default_factory=OptimizerSettings)
    mesh: MeshSettings = dataclasses.field(default_factory=MeshSettings)
    train: TrainSettings = dataclasses.field(default_factory=TrainSettings)
    grpo: GRPOSettings | None = None  # mode "grpo" only

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"mode={self.mode!r}: choose one of {MODES}")

    def replace(self, **sections) -> RunConfig:
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict:
        """Every section as JSON-ready data (no `grpo` section outside GRPO)."""
        out = dataclasses.asdict(self)
        if self.grpo is None:
            del out["grpo"]
        return out
