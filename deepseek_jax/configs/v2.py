"""DeepSeek-V2 (236B total, 21B active) pretraining, paper section 3.2.1 exactly:

8.1T tokens at sequence length 4096; the batch ramped from 2304 to 9216 sequences over the
first 225B tokens (here a staircase 2304, 4608, 6912 of 75B tokens each), then 9216; AdamW
(0.9, 0.95), weight decay 0.1, clip 1.0; the rate warmed up over 2000 steps to 2.4e-4, then
x0.316 after 60% and after 90% of the tokens; init std 0.006; balance-loss weights 0.003,
0.05, 0.02 with M = 3 of 8 groups on 8 expert devices; capacity factor 1.0 with 10% of the
sequences never dropped; plain RoPE (YaRN comes after pretraining: configs/v2_long.py).

    python -m deepseek_jax.train.schedule --config v2      # the plan, step by step
"""

from deepseek_jax.configs import base_config


def get_config():
    config = base_config("v2")  # the preset carries init std 0.006 and alpha1-3 of the paper
    # The compute dtype stays "auto": bf16 on TPU and GPU.
    config.model.remat_policy = "dots_with_no_batch_dims_saveable"
    config.model.rope_scaling = None  # paper 3.2.2: YaRN only in the long-context stage
    config.model.max_position_embeddings = 4096
    config.model.capacity_factor = 1.0  # paper 2.2.4; 10% never dropped: the default
    config.mesh.expert = 8  # one routing group per device: M = 3 of the 8 bounds the all-to-all
    config.data.seq_len = 4096
    # AdamW, clip, warmup and the rate's steps are paper 3.2.1's: the defaults (train/settings.py).
    config.train.update(steps=0, tokens=8_100_000_000_000, batch_size=9216)  # length in tokens
    config.train.update(ramp_start=2304, ramp_tokens=225_000_000_000, ramp_stages=3)
    # 9 micro-batches: every ramp size / 9 (256, 512, 768, 1024) splits over any power of two
    # of token-splitting devices up to 256.
    config.train.micro_steps = 9
    config.train.run_dir = "runs/v2"
    return config
