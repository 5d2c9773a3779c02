"""SFT (mode "sft"): a byte-level model on chat data, loss on the assistant's tokens only.
The default data is the addition task of `bench/addition_demo.py` (which writes it):

    python bench/addition_demo.py --out runs/addition      # or any JSONL of {"messages": ...}
    deepseek-jax-train --config sft --config.data.path=runs/addition/train.jsonl
"""

from deepseek_jax.configs import base_config


def get_config():
    config = base_config("tiny")
    config.mode = "sft"
    config.model.num_hidden_layers = 2
    # Wider than the paper's 0.006 (meant for width 5120): at width 256 it breaks symmetry
    # sooner. With it and the rate below, addition is learned from step ~200 on (two seeds
    # measured); at 3e-3 it was still unlearned at step 400 (and at 2,000 with init 0.006).
    config.model.initializer_range = 0.02
    config.data.update(source="chat", path="runs/addition/train.jsonl", text_field="messages")
    config.data.update(seq_len=128, holdout_fraction=0.02)
    config.optimizer.update(learning_rate=1e-3, warmup_steps=30, weight_decay=0.0)
    config.train.update(steps=400, log_every=20, eval_every=100, save_every=100)
    config.train.run_dir = "runs/sft"
    return config
