"""The ml-collections config every deepseek_jax/configs/*.py starts from.

model      every ModelConfig field (a preset's values), overridable one by one
mode       pretrain | sft | grpo (train.py runs the matching loop)
mesh       device mesh axis sizes (deepseek_jax/parallel)
data       source, path, tokenizer, seq_len, held-out share (deepseek_jax/data)
optimizer  AdamW and the schedule (paper 3.2.1 values)
train      steps, batch, accumulation, logging, eval, checkpoints, run directory
"""

from __future__ import annotations

import ml_collections

from deepseek_jax.config import preset


def base_config(model_preset: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.mode = "pretrain"  # pretrain | sft (configs/sft.py) | grpo (configs/grpo.py)
    config.model = preset(model_preset).to_dict()

    config.data = ml_collections.ConfigDict()
    config.data.source = "stdlib"  # stdlib | text | jsonl | parquet | arrayrecord | chat
    config.data.path = ""  # file, folder or glob (arrayrecord: the `prepare` output folder)
    config.data.text_field = "text"  # jsonl / parquet; chat: the messages field
    config.data.tokenizer = "byte"
    config.data.seq_len = 256
    config.data.holdout_fraction = 0.01  # the last 1% of the token stream is held out

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 2.4e-4
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.95
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.1
    config.optimizer.warmup_steps = 2000
    config.optimizer.schedule = "step"  # step (the paper's) | cosine
    config.optimizer.decay_at = (0.6, 0.9)  # step: fractions of the run's TOKENS, paper 3.2.1
    config.optimizer.decay_factor = 0.316  # step: the rate is multiplied by it at each point
    config.optimizer.final_fraction = 0.1  # cosine only: final rate / peak
    config.optimizer.clip_norm = 1.0

    config.mesh = ml_collections.ConfigDict()  # docs/design.md 5; product = every device of the job
    config.mesh.data = 0  # 0: the devices the other axes leave
    config.mesh.fsdp = 1
    config.mesh.expert = 1
    config.mesh.tensor = 1

    config.train = ml_collections.ConfigDict()
    config.train.steps = 10000  # the run's length: steps, or (steps 0) ...
    config.train.tokens = 0  # ... tokens; train/schedule.py turns them into steps
    config.train.batch_size = 16  # global, in sequences of data.seq_len (the ramp's last size)
    # Batch ramp (paper 3.2.1, train/schedule.py): ramp_stages sizes from ramp_start up, each for
    # an equal share of ramp_tokens, then batch_size. ramp_start 0: fixed. One compile a size.
    config.train.ramp_start = 0
    config.train.ramp_tokens = 0
    config.train.ramp_stages = 3
    config.train.micro_steps = 1  # gradient accumulation: batch_size / micro_steps per pass
    config.train.seed = 0  # params, data order
    config.train.log_every = 10
    config.train.eval_every = 500
    config.train.eval_batches = 0  # per periodic eval, 0: all; the last eval uses all
    config.train.save_every = 1000
    config.train.keep = 3
    config.train.async_checkpoint = True
    config.train.save_timeout_s = 1800.0  # longest wait on one checkpoint call, then stop
    config.train.run_dir = "runs/default"
    # Start from these weights (HF dir, hub id, or run dir[:step]) instead of a random init;
    # their architecture must be config.model's. A run that has saved resumes instead.
    config.train.init_from = ""
    config.train.compilation_cache = ""  # a folder: compiled steps are reused across runs
    config.train.continues = ""  # the stage this config continues (needs init_from), if any
    return config
