"""A few-second training config, a packed batch, addition chats and train.py flags for the
training tests."""

import json
import os

import numpy as np

from deepseek_jax.configs import base_config, from_config_dict
from deepseek_jax.data import packing
from deepseek_jax.data.sources import stdlib_files

CACHE = os.environ.get(
    "DEEPSEEK_JAX_TEST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)


def write_corpus(directory, files: int = 30) -> str:
    """The first `files` standard-library modules, copied as a small text corpus."""
    os.makedirs(directory, exist_ok=True)
    for i, name in enumerate(stdlib_files()[:files]):
        with open(name, encoding="utf-8", errors="replace") as f:
            text = f.read()[:4000]
        with open(os.path.join(directory, f"doc{i:03d}.py"), "w") as f:
            f.write(text)
    return str(directory)


def write_additions(path, n: int = 400) -> str:
    """`n` chats "ab+cd" -> the sum zero-padded and reversed (bench/addition_demo.py's task)."""
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for a, b in rng.integers(0, 100, (n, 2)).tolist():
            turns = [{"role": "user", "content": f"{a:02d}+{b:02d}"}]
            turns.append({"role": "assistant", "content": str(a + b).zfill(3)[::-1]})
            f.write(json.dumps({"messages": turns}) + "\n")
    return str(path)


def small_config(tmp_path, **train):
    """`tiny` cut to 2 layers, rows of 64 bytes, batches of 4, on a 30-file corpus."""
    config = base_config("tiny")
    config.model.num_hidden_layers = 2
    config.data.source = "text"
    config.data.path = write_corpus(os.path.join(tmp_path, "corpus"))
    config.data.seq_len = 64
    config.data.holdout_fraction = 0.1
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 2
    config.train.steps = 12
    config.train.batch_size = 4
    config.train.log_every = 2
    config.train.eval_every = 6
    config.train.eval_batches = 2
    config.train.save_every = 6
    config.train.run_dir = os.path.join(tmp_path, "run")
    config.train.compilation_cache = CACHE
    for key, value in train.items():
        config.train[key] = value
    return config


def typed(config):
    """The ConfigDict as the library takes it: what the commands do at their edge."""
    return from_config_dict(config)


def cli_flags(config, model_keys=("num_hidden_layers",)) -> list[str]:
    """The config as train.py command-line overrides (of the model, only `model_keys`)."""
    out = []
    for section in ("mesh", "data", "optimizer", "train", "grpo"):
        for key, value in config.get(section, {}).items():
            out.append(f"--config.{section}.{key}={value}")
    out += [f"--config.model.{key}={config.model[key]}" for key in model_keys]
    return out


def random_batch(b=4, t=32):
    """A batch of `b` rows [b, t], each two short documents packed."""
    rows = [packing.pack([np.arange(1, 12) + i, np.arange(50, 80) + i], t) for i in range(b)]
    examples = [packing.example(*next(r)) for r in rows]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
