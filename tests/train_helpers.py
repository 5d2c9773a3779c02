"""A few-second training config, a packed batch and train.py flags for the training tests."""

import os

import numpy as np

from deepseek_jax.data import packing
from deepseek_jax.data.sources import stdlib_files
from deepseek_jax.train.defaults import base_config

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


def cli_flags(config) -> list[str]:
    """The config as train.py command-line overrides."""
    out = []
    for section in ("mesh", "data", "optimizer", "train"):
        for key, value in config[section].items():
            out.append(f"--config.{section}.{key}={value}")
    out.append(f"--config.model.num_hidden_layers={config.model.num_hidden_layers}")
    return out


def random_batch(b=4, t=32):
    """A batch of `b` rows [b, t], each two short documents packed."""
    rows = [packing.pack([np.arange(1, 12) + i, np.arange(50, 80) + i], t) for i in range(b)]
    examples = [packing.example(*next(r)) for r in rows]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
