"""HF checkpoint import/export: round trips, shards, dtypes, .bin files, broken checkpoints,
tied embeddings, and the peak host memory of a load."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from hf_models import build_hf, hf_logits

import deepseek_jax as dj

VARIANT = dict(q_lora_rank=24, num_hidden_layers=2)


def logits(cfg, params, tokens):
    return np.asarray(dj.DeepSeekV2(cfg).apply({"params": params}, tokens).logits)


def tokens_for(cfg, seed=0):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, (2, 16))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random 2-layer HF checkpoint (dense + MoE, q compression) and its transformers model."""
    directory = tmp_path_factory.mktemp("hf")
    return directory, build_hf(directory, **VARIANT)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact(hf_dir, tmp_path):
    directory, _ = hf_dir
    cfg, params = dj.load_hf(directory)
    dj.save_hf(tmp_path, cfg, params)
    cfg2, params2 = dj.load_hf(tmp_path)
    assert cfg2 == cfg
    assert_trees_equal(params2, params)


def test_sharded_save_loads_in_both(hf_dir, tmp_path):
    """Small shards: several files and an index, read back by load_hf and by transformers."""
    directory, hf_model = hf_dir
    cfg, params = dj.load_hf(directory)
    dj.save_hf(tmp_path, cfg, params, max_shard_bytes=40_000)
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    assert len(shards) > 3
    with open(tmp_path / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert sorted(set(weight_map.values())) == shards

    assert_trees_equal(dj.load_hf(tmp_path)[1], params)
    reloaded = transformers.DeepseekV2ForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    tokens = tokens_for(cfg)
    expected = hf_logits(hf_model, tokens)
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), expected)
    np.testing.assert_allclose(logits(cfg, params, tokens), expected, atol=1e-4, rtol=0)


def test_bfloat16_load(hf_dir):
    directory, _ = hf_dir
    _, params32 = dj.load_hf(directory)
    cfg, params16 = dj.load_hf(directory, dtype="bfloat16")
    assert cfg.param_dtype == cfg.dtype == "bfloat16"
    for x16, x32 in zip(jax.tree.leaves(params16), jax.tree.leaves(params32), strict=True):
        assert x16.dtype == ml_dtypes.bfloat16
        # Round to nearest, 8 significant bits: a relative error of at most 2^-8.
        np.testing.assert_allclose(np.asarray(x16, np.float32), np.asarray(x32), rtol=2**-8, atol=0)


def test_pytorch_bin_loads(hf_dir, tmp_path):
    """A `pytorch_model.bin` with the hub key names (transformers 5 no longer writes one)."""
    directory, hf_model = hf_dir
    state = safetensors.torch.load_file(directory / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    cfg, params = dj.load_hf(tmp_path)
    assert_trees_equal(params, dj.load_hf(directory)[1])
    tokens = tokens_for(cfg)
    np.testing.assert_allclose(
        logits(cfg, params, tokens), hf_logits(hf_model, tokens), atol=1e-4, rtol=0
    )


def broken_copy(source, target, edit):
    """Copies the checkpoint at `source` to `target` with `edit(tensors)` applied."""
    tensors = safetensors.numpy.load_file(source / "model.safetensors")
    edit(tensors)
    safetensors.numpy.save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    (target / "config.json").write_text((source / "config.json").read_text())


EXPERT_KEY = "model.layers.1.mlp.experts.3.up_proj.weight"
KV_B_KEY = "model.layers.0.self_attn.kv_b_proj.weight"


def drop_expert(t):
    del t[EXPERT_KEY]


def add_expert(t):
    t[EXPERT_KEY.replace(".3.", ".99.")] = t[EXPERT_KEY]


def truncate_kv_b(t):
    t[KV_B_KEY] = t[KV_B_KEY][:-1]


@pytest.mark.parametrize(
    "edit, error, key",
    [
        (drop_expert, KeyError, EXPERT_KEY),
        (add_expert, ValueError, EXPERT_KEY.replace(".3.", ".99.")),
        (truncate_kv_b, ValueError, KV_B_KEY),
    ],
    ids=["missing", "unexpected", "misshaped"],
)
def test_broken_checkpoint_names_the_key(hf_dir, tmp_path, edit, error, key):
    directory, _ = hf_dir
    broken_copy(directory, tmp_path, edit)
    with pytest.raises(error, match=re.escape(key)):
        dj.load_hf(tmp_path)


def test_tied_embeddings_both_ways(tmp_path):
    """A tied HF model loads and matches; saved back, transformers reads the same model."""
    hf_model = build_hf(tmp_path / "hf", tie_word_embeddings=True, num_hidden_layers=2)
    cfg, params = dj.load_hf(tmp_path / "hf")
    assert cfg.tie_word_embeddings and "lm_head" not in params
    tokens = tokens_for(cfg)
    expected = hf_logits(hf_model, tokens)
    np.testing.assert_allclose(logits(cfg, params, tokens), expected, atol=1e-4, rtol=0)

    dj.save_hf(tmp_path / "ours", cfg, params)
    reloaded = transformers.DeepseekV2ForCausalLM.from_pretrained(
        tmp_path / "ours", attn_implementation="eager"
    ).eval()
    np.testing.assert_allclose(hf_logits(reloaded, tokens), expected, atol=1e-6, rtol=0)


MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, threading, time
    import jax, numpy as np
    import deepseek_jax as dj

    def anonymous_rss():
        # Anonymous memory only: the memory-mapped checkpoint pages are file-backed, reclaimable.
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024

    jax.device_put(np.zeros(4)).block_until_ready()
    base = anonymous_rss()
    peak, done = [base], []

    def poll():
        while not done:
            peak[0] = max(peak[0], anonymous_rss())
            time.sleep(2e-4)

    thread = threading.Thread(target=poll)
    thread.start()
    cfg, params = dj.load_hf(sys.argv[1])
    jax.block_until_ready(params)
    done.append(True)
    thread.join()
    leaves = jax.tree.leaves(params)
    print(json.dumps({
        "peak": peak[0] - base,
        "result": sum(x.nbytes for x in leaves),
        "largest": max(x.nbytes for x in leaves),
    }))
    """
)


def test_load_peak_memory(tmp_path):
    """Peak anonymous memory of a load is the result plus one (stacked) leaf, not twice the
    result. Sampled from /proc in a thread, so it can only under-read a short spike."""
    cfg = dj.preset("tiny").replace(
        num_hidden_layers=3, moe_intermediate_size=256, n_routed_experts=64
    )
    # Values do not matter here, only sizes: fill numpy leaves rather than compile an init.
    shapes = jax.eval_shape(lambda: dj.init_params(cfg, jax.random.key(0)))
    dj.save_hf(tmp_path, cfg, jax.tree.map(lambda s: np.full(s.shape, 0.01, np.float32), shapes))
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["result"] > 100e6 and m["largest"] < m["result"] / 3
    slack = 24 << 20  # interpreter, tracing of the shapes, allocator rounding
    assert m["peak"] <= m["result"] + m["largest"] + slack, m
