"""DeepSeek-V2-Lite (15.7B total, 2.4B active) pretraining, paper Appendix B:

5.7T tokens at sequence length 4096 with a constant batch of 4608 sequences; AdamW (0.9,
0.95), weight decay 0.1, clip 1.0; the rate warmed up over 2000 steps to 4.2e-4, then x0.316
after 80% and after 90% of the tokens; balance loss alpha1 = 0.001 only: all experts of a
layer sit on one device (one routing group), where the device- and communication-level losses
are a constant 1 with zero gradient, so their weights are 0. Plain RoPE at 4K (YaRN comes with
the long-context stage). bf16 compute; needs accelerators.
"""

from deepseek_jax.configs import base_config


def get_config():
    config = base_config("v2_lite")  # the preset carries alpha1 = 0.001
    # The compute dtype stays "auto": bf16 on TPU and GPU.
    config.model.remat_policy = "dots_with_no_batch_dims_saveable"
    config.model.rope_scaling = None  # YaRN comes with the long-context stage
    config.model.max_position_embeddings = 4096
    config.model.update(aux_loss_alpha2=0.0, aux_loss_alpha3=0.0)  # one routing group
    config.mesh.expert = 1  # every expert of a layer on one device (Appendix B)
    config.data.seq_len = 4096
    config.optimizer.update(learning_rate=4.2e-4, decay_at=(0.8, 0.9))  # warmup: the default
    config.train.update(steps=0, tokens=5_700_000_000_000, batch_size=4608)
    config.train.micro_steps = 9  # 512 sequences per micro-batch
    config.train.run_dir = "runs/v2_lite"
    return config
