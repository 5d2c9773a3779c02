"""Test set-up: a persistent XLA compilation cache keeps repeated compiles of the same small
models cheap across test files and runs."""

import os

import jax

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "DEEPSEEK_JAX_TEST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
