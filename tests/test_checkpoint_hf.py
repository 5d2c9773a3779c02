"""HF checkpoint import/export: round trips, shards, dtypes, .bin files, broken checkpoints,
tied embeddings, and the peak host memory of a load."""

import json
import os
import shutil
import socket
import subprocess
import sys

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
from deepseek_jax.checkpoint import load_checkpoint, read_weights
from deepseek_jax.checkpoint import orbax as orbax_checkpoint
from deepseek_jax.checkpoint.hf import placement
from deepseek_jax.checkpoint.orbax import save_params
from deepseek_jax.checkpoint.safetensors_io import TensorDirectory
from deepseek_jax.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
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
    assert (cfg.param_dtype, cfg.dtype) == ("bfloat16", "auto")  # compute: per platform
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


def one_line_error(match_all, call):
    """call() raises a one-line UserError holding every string of match_all."""
    with pytest.raises(UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message, message
    for part in match_all:
        assert part in message, message
    return message


@pytest.mark.parametrize(
    "edit, key",
    [
        (drop_expert, EXPERT_KEY),
        (add_expert, EXPERT_KEY.replace(".3.", ".99.")),
        (truncate_kv_b, KV_B_KEY),
    ],
    ids=["missing", "unexpected", "misshaped"],
)
def test_broken_checkpoint_names_the_key(hf_dir, tmp_path, edit, key):
    directory, _ = hf_dir
    broken_copy(directory, tmp_path, edit)
    one_line_error([key], lambda: dj.load_hf(tmp_path))


def damaged_copy(source, target, damage):
    """A copy of the checkpoint at `source` whose model.safetensors bytes go through damage."""
    data = (source / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(damage(data))
    (target / "config.json").write_text((source / "config.json").read_text())
    return target / "model.safetensors"


def header_of(data: bytes) -> tuple[dict, int]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), size


def last_tensor(data: bytes) -> str:
    header, _ = header_of(data)
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def shifted_offsets(data: bytes) -> bytes:
    header, size = header_of(data)
    header[last_tensor(data)]["data_offsets"][1] += 4
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size
    text = text.ljust(size)
    return data[:8] + text[:size] + data[8 + size :]


@pytest.mark.parametrize(
    "damage, names_tensor",
    [
        (lambda d: d[: len(d) - 100], True),  # truncated: the last tensor ends past the end
        (shifted_offsets, True),  # an offset that does not hold the tensor's shape
        (lambda d: d[:8] + b"\xff{not json" + d[19:], False),
        (lambda d: (2**60).to_bytes(8, "little") + d[8:], False),  # an absurd header length
        (lambda d: d[:5], False),
    ],
    ids=["truncated", "offsets", "not_json", "absurd_length", "no_header"],
)
def test_damaged_safetensors_names_file_and_tensor(hf_dir, tmp_path, damage, names_tensor):
    directory, _ = hf_dir
    data = (directory / "model.safetensors").read_bytes()
    path = damaged_copy(directory, tmp_path, damage)
    parts = [str(path)] + ([repr(last_tensor(data))] if names_tensor else [])
    one_line_error(parts, lambda: dj.load_hf(tmp_path))


def test_legacy_bin_is_read_without_mmap(hf_dir, tmp_path):
    """A pre-1.6 (non-zip) pytorch_model.bin cannot be memory-mapped: read whole, still with
    weights_only=True; a damaged one is named in one line."""
    directory, _ = hf_dir
    state = safetensors.torch.load_file(directory / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    assert_trees_equal(dj.load_hf(tmp_path)[1], dj.load_hf(directory)[1])

    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02garbage" * 10)
    one_line_error([str(tmp_path / "pytorch_model.bin")], lambda: dj.load_hf(tmp_path))


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


def probe(directory, mesh_flag, *extra, devices=8, timeout=300, **env_vars) -> dict:
    """tests/load_probe.py in a fresh process with `devices` fake CPU devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update(env_vars)
    run = subprocess.run(
        [sys.executable, os.path.join(HERE, "load_probe.py"), str(directory), mesh_flag, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def write_big_checkpoint(directory, **changes):
    """A multi-shard checkpoint of a few hundred MB whose experts dominate; values do not matter
    here, only sizes, so numpy leaves are filled rather than an init compiled."""
    sizes = dict(num_hidden_layers=5, moe_intermediate_size=384, n_routed_experts=64)
    cfg = dj.preset("tiny").replace(**{**sizes, **changes})
    shapes = jax.eval_shape(lambda: dj.init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
    dj.save_hf(directory, cfg, params, max_shard_bytes=64 << 20)
    return cfg


def test_sharded_load_peak_memory(tmp_path):
    """On 8 devices with expert=8, the peak resident memory of a load (VmHWM) stays within the
    placed arrays plus one layer's block of one leaf: no host copy of the model or of a leaf.
    The layer-at-a-time path is forced: it is the one that bounds a real model's load. Saving
    it back from the mesh peaks at a few tensors."""
    write_big_checkpoint(tmp_path)
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) >= 4
    m = probe(tmp_path, "expert=8", LOAD_PROBE_LAYERWISE="1", LOAD_PROBE_SAVE="1")
    assert m["checkpoint"] > 250e6 and m["read"] == m["checkpoint"], m
    slack = 32 << 20  # allocator rounding, tracing, small replicated leaves in flight
    assert m["peak"] <= m["placed"] + m["largest_layer_block"] + slack, m
    # Saving it back from the mesh gathers one tensor at a time: no copy of a leaf or the model.
    assert m["save_peak"] <= 4 * m["largest_tensor"] + slack, m
    print(json.dumps(m))


def test_two_processes_read_half_each_and_save_back(tmp_path):
    """Two gloo processes of 4 devices each, expert=8: each reads only the experts its devices
    hold (about half of the checkpoint) and every shard equals the plain reading. Then both
    save the params back (no process holds every shard): process 0 writes the checkpoint,
    equal bit for bit to the one read, process 1 writes nothing, and each peaks at a few
    tensors above the arrays (one slice gathered at a time, not a leaf)."""
    checkpoint = tmp_path / "checkpoint"
    write_big_checkpoint(checkpoint, num_hidden_layers=3, moe_intermediate_size=128)
    address = f"127.0.0.1:{free_port()}"
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        LOAD_PROBE_SAVE=str(tmp_path / "saved"),
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "load_probe.py"),
                str(checkpoint),
                "expert=8",
                address,
                str(rank),
                "2",
                "check",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-4000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    slack = 32 << 20  # allocator rounding, tracing, small replicated leaves in flight
    for m in results:
        assert m["shards_equal"], m
        assert 0.45 < m["read"] / m["checkpoint"] < 0.6, m
        assert m["save_peak"] <= 8 * m["largest_tensor"] + slack, m
    assert sorted(os.listdir(tmp_path / "saved")) == ["rank0"]
    original = TensorDirectory(str(checkpoint))
    saved = TensorDirectory(str(tmp_path / "saved" / "rank0"))
    assert saved.keys() == original.keys()
    for key in original.keys():
        assert np.array_equal(saved[key], original[key]), key
    print(json.dumps(results))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_read_weights_checks_architecture_only(hf_dir, tmp_path):
    """init_from: execution fields may differ (the weights are read); an architecture field
    that differs is named, and so is a run step that was never saved."""
    directory, _ = hf_dir
    cfg, params = dj.load_hf(directory)
    execution = cfg.replace(scan_unroll=2, remat_policy="full", capacity_factor=1.5)
    assert_trees_equal(read_weights(directory, execution, placement(execution, None)), params)

    wider = cfg.replace(kv_lora_rank=48)
    one_line_error(
        ["kv_lora_rank: 32 vs 48"], lambda: read_weights(directory, wider, placement(wider, None))
    )
    save_params(tmp_path / "run", cfg, params)
    assert_trees_equal(read_weights(f"{tmp_path / 'run'}:0", cfg, placement(cfg, None)), params)
    cfg16, params16 = load_checkpoint(tmp_path / "run", dtype="bfloat16")  # cast on restore
    assert cfg16.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params16)} == {np.dtype(ml_dtypes.bfloat16)}
    one_line_error(
        ["no complete step 5", "[0]"],
        lambda: read_weights(f"{tmp_path / 'run'}:5", cfg, placement(cfg, None)),
    )


HUB_PROBE = """
import sys
import deepseek_jax as dj
from deepseek_jax.checkpoint.convert import main
cfg, params = dj.load_hf("someone/tiny-v2")
print("layers", cfg.num_hidden_layers)
main(["someone/tiny-v2", sys.argv[1]])
try:
    dj.load_hf("someone/not-cached")
except dj.errors.UserError as e:
    print("error", e)
"""


def test_hub_ids_offline_from_a_filled_cache(hf_dir, tmp_path):
    """A hub id resolves through huggingface_hub's cache with HF_HUB_OFFLINE=1 (a fresh
    process: huggingface_hub reads its environment once, at import)."""
    directory, _ = hf_dir
    repo = tmp_path / "hub" / "models--someone--tiny-v2"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in os.listdir(directory):
        shutil.copy(directory / name, snapshot)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    run = subprocess.run(
        [sys.executable, "-c", HUB_PROBE, str(tmp_path / "orbax")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0] == "layers 2" and "(hf) -> " in lines[1], lines
    assert lines[2].startswith("error 'someone/not-cached' is no local directory") and (
        "HF_HUB_OFFLINE" in lines[2]
    ), lines
    assert orbax_checkpoint.load_params(tmp_path / "orbax")[0] == dj.load_hf(directory)[0]
