"""Generation: the latent cache holds C + R numbers per token and decode never expands it,
decode logits equal the full forward's at every position, greedy generation equals
transformers' token for token, eos stops rows, sampling filters, bad input is refused."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import GROUP_LIMITED, YARN, build_hf

import deepseek_jax as dj
from deepseek_jax.generate.cache import (
    expanded_bytes_per_token,
    latent_bytes_per_token,
    nbytes,
)
from deepseek_jax.generate.loop import decode_step, generate_padded, pad_prompts, prefill
from deepseek_jax.generate.sampling import argmax, sample, top_k_filter, top_p_filter
from deepseek_jax.model.transformer import unstack_params

# Every size distinct, so that a shape in the decode program says which axes it has.
SMALL = dict(
    vocab_size=101,
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=3,
    q_lora_rank=None,
    kv_lora_rank=20,
    qk_nope_head_dim=10,
    qk_rope_head_dim=6,
    v_head_dim=14,
    intermediate_size=72,
    moe_intermediate_size=24,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    first_k_dense_replace=1,
    max_position_embeddings=64,
    rope_scaling=None,
    initializer_range=0.1,
)
CONFIGS = {
    "plain": dj.ModelConfig(**SMALL),
    # original context 8 and positions up to 30: the YaRN ramp and mscale are both live.
    "yarn_q_lora": dj.ModelConfig(**SMALL).replace(
        q_lora_rank=18,
        rope_scaling=dj.YarnConfig(
            factor=4.0, original_max_position_embeddings=8, mscale=0.8, mscale_all_dim=0.6
        ),
    ),
    "tied_two_dense": dj.ModelConfig(**SMALL).replace(
        tie_word_embeddings=True, first_k_dense_replace=2
    ),
    # Blocks of 8: the 31-token forward runs blockwise, decode reads the cache in 4 blocks.
    "blocks_of_8": dj.ModelConfig(**SMALL).replace(attention_block_size=8),
}


@functools.cache
def random_params(name):
    cfg = CONFIGS[name]
    return cfg, jax.jit(dj.init_params, static_argnums=0)(cfg, jax.random.key(1))


jit_prefill = jax.jit(prefill, static_argnames=("cfg", "cache_len"))


@functools.partial(jax.jit, static_argnames=("cfg",))
def jit_decode(cfg, params, tokens, positions, cache):
    return decode_step(cfg, unstack_params(cfg, params), tokens, positions, cache)


def test_cache_holds_only_latents():
    cfg, params = random_params("plain")
    tokens, lengths = pad_prompts(cfg, [[1, 2, 3], [4]], max_new_tokens=5)
    _, cache = jit_prefill(cfg, params, tokens, lengths, cache_len=8)
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # fp32
    assert nbytes(cache) == 2 * 8 * per_token
    assert latent_bytes_per_token(cfg) == per_token
    v2 = dj.preset("v2")
    assert latent_bytes_per_token(v2, "bfloat16") == 60 * 576 * 2
    assert expanded_bytes_per_token(v2, "bfloat16") == 60 * 128 * (128 + 64 + 128) * 2


def sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from sub_jaxprs(v)


def all_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for value in eqn.params.values():
            for sub in sub_jaxprs(value):
                yield from all_shapes(sub)


def test_decode_never_expands_the_cache():
    """No value in the decode program has both a cache-slot axis and a per-head key or value
    axis: the absorbed form attends to the latents directly (docs/design.md 1)."""
    cfg, params = random_params("plain")
    slots, batch = 37, 2
    cache = dj.init_cache(cfg, batch, slots)
    tokens, positions = jnp.zeros(batch, jnp.int32), jnp.full(batch, 3, jnp.int32)
    step = functools.partial(decode_step, cfg, unstack_params(cfg, params))
    jaxpr = jax.make_jaxpr(step)(tokens, positions, cache)
    head_dims = {cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.qk_head_dim}
    shapes = set(all_shapes(jaxpr.jaxpr))
    assert any(slots in s for s in shapes)  # the check below can see the slot axis
    expanded = [
        s for s in shapes if slots in s and cfg.num_attention_heads in s and head_dims & set(s)
    ]
    assert not expanded, f"per-head keys/values over the cache: {expanded}"


def test_prefill_computes_only_the_last_logits():
    """No value in the prefill program spans prompt positions and the vocabulary: the head
    runs on each row's last real position alone (its logits: the test below)."""
    cfg, params = random_params("plain")
    tokens, lengths = pad_prompts(cfg, [[1, 2, 3, 4, 5], [6]], max_new_tokens=3)
    jaxpr = jax.make_jaxpr(functools.partial(prefill, cfg, params, cache_len=8))(tokens, lengths)
    shapes = set(all_shapes(jaxpr.jaxpr))
    assert (2, 5, cfg.hidden_size) in shapes  # the check can see the prompt axis
    assert not [s for s in shapes if 5 in s and cfg.vocab_size in s]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_logits_equal_full_forward(name):
    """Ragged prefill (lengths 3 and 1), then one token a step: every position's logits
    equal the full forward's, out to position 30 (far past YaRN's original context of 8)."""
    cfg, params = random_params(name)
    t = 31
    tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, t)).astype(np.int32)
    full = np.asarray(dj.DeepSeekV2(cfg).apply({"params": params}, tokens).logits)

    lengths = np.array([3, 1], np.int32)
    first, cache = jit_prefill(cfg, params, tokens[:, :3], lengths, cache_len=t)
    np.testing.assert_allclose(first, full[[0, 1], lengths - 1], atol=1e-4, rtol=0)
    rows = np.arange(2)
    for step in range(t - 3):
        positions = lengths + step
        logits, cache = jit_decode(cfg, params, tokens[rows, positions], positions, cache)
        np.testing.assert_allclose(logits, full[rows, positions], atol=1e-4, rtol=0)


HF_VARIANTS = {
    "plain": dict(),
    "q_lora_yarn": dict(q_lora_rank=24, rope_parameters=YARN),
    "group_limited": GROUP_LIMITED,
}


@pytest.mark.parametrize("name", sorted(HF_VARIANTS))
def test_greedy_equals_transformers(tmp_path, name):
    """48 greedy tokens after three prompts of different lengths, batched in one call, equal
    transformers' generate(do_sample=False) on each prompt."""
    hf_model = build_hf(tmp_path, **HF_VARIANTS[name])
    cfg, params = dj.load_hf(tmp_path)
    rng = np.random.RandomState(3)
    prompts = [rng.randint(0, cfg.vocab_size, n).tolist() for n in (5, 14, 9)]
    ours = np.asarray(dj.generate(cfg, params, prompts, max_new_tokens=48))
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            hf = hf_model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=48, min_new_tokens=48
            )
        np.testing.assert_array_equal(ours[row], hf[0, len(prompt) :].numpy())


def test_eos_stops_each_row_and_the_loop():
    cfg, params = random_params("plain")
    prompts = [[5, 6, 7], [8], [9, 10]]
    free = np.asarray(dj.generate(cfg, params, prompts, max_new_tokens=12))
    eos = int(free[0, 3])
    stopped = np.asarray(dj.generate(cfg, params, prompts, max_new_tokens=12, eos=eos))
    for row in range(3):
        hits = np.flatnonzero(free[row] == eos)
        end = hits[0] + 1 if hits.size else 12
        np.testing.assert_array_equal(stopped[row, :end], free[row, :end])
        assert (stopped[row, end:] == eos).all()

    tokens, lengths = pad_prompts(cfg, prompts[:1], 12)
    _, steps = generate_padded(
        params, tokens, lengths, jax.random.key(0), cfg=cfg, max_new_tokens=12, eos=eos
    )
    first_eos = int(np.flatnonzero(free[0] == eos)[0])
    assert int(steps) == first_eos + 1  # the loop ended when its only row was done


def test_stream_sees_every_step_in_order():
    cfg, params = random_params("plain")
    seen = []

    def stream(step, tokens):
        seen.append((int(step), np.asarray(tokens).tolist()))

    new = np.asarray(dj.generate(cfg, params, [[1, 2], [3]], max_new_tokens=6, stream=stream))
    jax.effects_barrier()
    assert [s for s, _ in seen] == list(range(6))
    assert np.array_equal(np.array([t for _, t in seen]).T, new)


def test_sampling_settings():
    cfg, params = random_params("plain")
    prompts = [[1, 2, 3], [4, 5]]
    greedy = np.asarray(dj.generate(cfg, params, prompts, max_new_tokens=8))
    sample_ = functools.partial(dj.generate, cfg, params, prompts, 8, 1.5)
    np.testing.assert_array_equal(sample_(top_k=1), greedy)
    np.testing.assert_array_equal(sample_(top_p=1e-6), greedy)
    np.testing.assert_array_equal(sample_(seed=4), sample_(seed=4))
    assert not np.array_equal(sample_(seed=4), sample_(seed=5))


def test_filters_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.1, 0.3, 0.1]]))
    assert np.isfinite(top_k_filter(logits, 2)).tolist() == [[True, False, True, False]]
    # 0.5 < 0.7, 0.5 + 0.3 reaches it: the two most likely stay.
    assert np.isfinite(top_p_filter(logits, 0.7)).tolist() == [[True, False, True, False]]
    assert np.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    draws = jax.vmap(lambda k: sample(logits, k, 1.0, top_p=0.7))(
        jax.random.split(jax.random.key(0), 2000)
    )
    share = np.bincount(np.asarray(draws).ravel(), minlength=4) / 2000
    np.testing.assert_allclose(share, [0.625, 0, 0.375, 0], atol=0.04)


@pytest.mark.parametrize(
    "prompts, new, message",
    [
        ([[1, 101]], 4, "token id 101, outside the model's vocabulary"),
        ([[1, -1]], 4, "token id -1"),
        ([list(range(60))], 5, "passes the context of 64"),
        ([[1], []], 4, "prompt 1 is empty"),
        ([[1]], 0, "max_new_tokens=0"),
    ],
)
def test_bad_input_is_refused(prompts, new, message):
    cfg, params = random_params("plain")
    with pytest.raises(ValueError, match=message):
        dj.generate(cfg, params, prompts, max_new_tokens=new)


def test_bad_settings_are_refused():
    cfg, params = random_params("plain")
    for kw, message in [
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"top_k": 0}, "top_k=0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"eos": 500}, "eos=500"),
    ]:
        with pytest.raises(ValueError, match=message):
            dj.generate(cfg, params, [[1]], max_new_tokens=2, **kw)


def test_sample_py_streams_and_refuses_bad_input(tmp_path, capsys):
    """deepseek-jax-sample on HF directories without tokenizer files (so: bytes)."""
    from deepseek_jax.cli import sample

    build_hf(tmp_path / "bytes", vocab_size=256, max_position_embeddings=48)
    build_hf(tmp_path / "narrow", vocab_size=96)
    sample.main(
        ["--checkpoint", str(tmp_path / "bytes"), "--prompt", "hi", "--max_new_tokens", "9"]
    )
    out, err = capsys.readouterr()
    assert out.startswith("hi")
    assert "--- 9 tokens" in err and "tokens/s" in err
    assert "480 bytes/token (3 layers x 40 numbers)" in err  # fp32, kv_lora 32 + rope 8

    for directory, argv, message in [
        ("missing", [], "does not exist"),
        ("bytes", ["--prompt", "x" * 45], "passes the context of 48"),
        ("narrow", ["--prompt", "hi"], "a vocabulary of 96, not the 256 bytes"),
    ]:
        with pytest.raises(SystemExit):
            sample.main(["--checkpoint", str(tmp_path / directory), *argv])
        err = capsys.readouterr().err
        assert (
            err.startswith("deepseek-jax-sample: ") and message in err and err.count("\n") == 1
        ), err


def test_generate_on_a_mesh_matches_and_returns_logprobs():
    """On the training mesh (one device here; tests/parallel_cases.py: eight) generation gives
    the same tokens, and its log-probs are log-softmax of the logits at temperature 1."""
    cfg, params = random_params("plain")
    prompts = [[1, 2, 3], [4, 5]]
    mesh = dj.make_mesh()
    plain = np.asarray(dj.generate(cfg, params, prompts, max_new_tokens=6))
    new, logp = dj.generate(
        cfg, dj.shard_params(cfg, params, mesh), prompts, 6, return_logprobs=True, mesh=mesh
    )
    np.testing.assert_array_equal(new, plain)
    logits = dj.DeepSeekV2(cfg).apply({"params": params}, np.array([prompts[0] + list(plain[0])]))
    expected = jax.nn.log_softmax(logits.logits[0, 2:-1], axis=-1)[np.arange(6), plain[0]]
    np.testing.assert_allclose(logp[0], expected, atol=1e-4)


def test_greedy_argmax_is_jnp_argmax():
    """sampling.argmax (two plain reductions) = jnp.argmax: the first of tied maxima, the first
    NaN, index 0 for a row of -inf, on random rows too."""
    rows = np.random.RandomState(0).randn(6, 33).astype(np.float32)
    rows[1, [4, 9]] = 10.0  # a tie
    rows[2, [3, 7]] = np.nan
    rows[3] = -np.inf
    rows[4, 5] = np.inf
    logits = jnp.asarray(rows)
    np.testing.assert_array_equal(argmax(logits), jnp.argmax(logits, axis=-1))


@pytest.mark.parametrize("name", ["plain", "tied_two_dense"])
def test_per_layer_params_sample_the_same_without_a_second_copy(name):
    """Params split once (`unstack_params`) give the stacked params' tokens and log-probs, and
    the compiled call holds no second copy of the layer weights: its temp buffers are under a
    quarter of them, the stacked call's larger by over half of them (the copy; a stack of
    one layer needs none)."""
    cfg, params = random_params(name)
    layer_params = jax.jit(dj.unstack_params, static_argnums=0)(cfg, params)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    stacked = dj.generate(cfg, params, prompts, 9, temperature=0.8, return_logprobs=True)
    split = dj.generate(cfg, layer_params, prompts, 9, temperature=0.8, return_logprobs=True)
    np.testing.assert_array_equal(split[0], stacked[0])
    np.testing.assert_allclose(split[1], stacked[1], atol=1e-5)

    layer_bytes = sum(
        x.nbytes
        for key, tree in params.items()
        if key.endswith("_layers")
        for x in jax.tree.leaves(tree)
    )
    tokens, lengths = pad_prompts(cfg, prompts, 9)

    def temp_bytes(tree):
        compiled = generate_padded.lower(
            tree, tokens, lengths, jax.random.key(0), cfg=cfg, max_new_tokens=9
        ).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    split_temp, stacked_temp = temp_bytes(layer_params), temp_bytes(params)
    assert split_temp < layer_bytes / 4
    assert stacked_temp - split_temp > layer_bytes / 2


def test_per_layer_params_run_on_a_mesh_of_one_and_are_refused_on_more():
    """A one-device mesh (the notebooks' on one GPU) takes them; a mesh of eight is in
    tests/parallel_cases.py."""
    cfg, params = random_params("plain")
    layer_params = dj.unstack_params(cfg, params)
    np.testing.assert_array_equal(
        dj.generate(cfg, layer_params, [[1, 2]], 3, mesh=dj.make_mesh()),
        dj.generate(cfg, params, [[1, 2]], 3),
    )


def test_unstack_params_can_delete_each_stack_once_split():
    """delete=True (deepseek-jax-sample on one device, the sample notebook) splits as the
    default does and deletes every stacked array: the peak is one stacked array more, not
    the layers twice."""
    cfg, params = random_params("tied_two_dense")
    mine = jax.tree.map(jnp.copy, params)
    split = unstack_params(cfg, mine, delete=True)
    jax.tree.map(np.testing.assert_array_equal, split, unstack_params(cfg, params))
    stacked = [
        x for k, tree in mine.items() if k.endswith("_layers") for x in jax.tree.leaves(tree)
    ]
    assert stacked and all(x.is_deleted() for x in stacked)
