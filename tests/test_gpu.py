"""On a GPU host only (skipped elsewhere): the model on the GPU against transformers, and the
GPU kernels (cuDNN attention, the Mosaic GPU grouped matmul of the experts) against the plain
paths they replace.

The CPU suite checks what a CPU host can of the GPU paths (test_export.py: a cuda export
carries ragged_all_to_all); cuDNN attention and the Mosaic GPU kernels trace only on a GPU
host, so this file is where they are checked. The model at fp32 compute takes "highest"
matmul precision itself (config.matmul_precision; a GPU's default rounds fp32 matmul inputs
to TF32); its modules and kernels called directly are given it for their fp32 references.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import GROUP_LIMITED, build_hf, hf_logits
from test_kernels import CFG

import deepseek_jax as dj
from deepseek_jax.kernels.gmm import hopper_gmm
from deepseek_jax.model.experts import grouped_matmul
from deepseek_jax.model.mla import MLA
from deepseek_jax.model.moe import MoE
from deepseek_jax.model.rope import rope_cos_sin

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

# test_kernels' model: V2's head dims (dn 128 + dr 64 for q/k, dv 128), expert widths of 128.
B, T = 2, 256  # B T > moe.GPU_ALL_EXPERTS_TOKENS: the MoE layer takes the grouped matmul


def test_logits_match_transformers_on_the_gpu(tmp_path):
    hf_model = build_hf(tmp_path, **GROUP_LIMITED)
    cfg, params = dj.load_hf(tmp_path)
    cfg = cfg.replace(dtype="float32")
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (3, 64))
    ours = np.asarray(jax.jit(dj.DeepSeekV2(cfg).apply)({"params": params}, tokens).logits)
    np.testing.assert_allclose(ours, hf_logits(hf_model, tokens), atol=1e-4, rtol=0)


def test_cudnn_attention_is_as_close_to_fp32_as_the_plain_bf16_path():
    """MLA's training attention under bf16: kernels='cuda' (cuDNN, in the HLO) and 'plain',
    each against the fp32 plain result; the fused kernel's error is no worse than plain's."""
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(B, T, CFG.hidden_size).astype(np.float32))
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    segments = jnp.zeros((B, T), jnp.int32)
    cos, sin = rope_cos_sin(CFG, positions)
    params = jax.jit(MLA(CFG).init)(jax.random.key(1), x, cos, sin, positions, segments)["params"]

    def attend(kernels, dtype):
        mla = MLA(CFG.replace(kernels=kernels, dtype=dtype))
        f = jax.jit(lambda p, x: mla.apply({"params": p}, x, cos, sin, positions, segments)[0])
        return f, np.asarray(f(params, x.astype(dtype)), np.float32)

    with jax.default_matmul_precision("highest"):
        _, exact = attend("plain", "float32")
    fused, out_cuda = attend("cuda", "bfloat16")
    _, out_plain = attend("plain", "bfloat16")
    assert "cudnn" in fused.lower(params, x.astype(jnp.bfloat16)).compile().as_text()
    err_cuda = np.abs(out_cuda - exact).max()
    err_plain = np.abs(out_plain - exact).max()
    assert err_cuda <= 2 * err_plain + 1e-3 * np.abs(exact).max(), (err_cuda, err_plain)


def test_hopper_grouped_matmul_equals_the_plain_one_values_and_grads():
    """Rows sorted by group, an empty group and rows past the groups; bf16 inputs, each side's
    result against the fp32 tiled grouped matmul of the same inputs."""
    rng = np.random.RandomState(2)
    m, k, n = 1000, 256, 384
    sizes = jnp.asarray([300, 0, 129, 411, 100], jnp.int32)  # 940 of 1000 rows in groups
    lhs = jnp.asarray(rng.randn(m, k), jnp.bfloat16)
    rhs = jnp.asarray(0.1 * rng.randn(len(sizes), k, n), jnp.bfloat16)
    dout = jnp.asarray(rng.randn(m, n), jnp.bfloat16)

    def value_and_grads(fn, *args):
        out, vjp = jax.vjp(fn, *args)
        return [np.asarray(x, np.float32) for x in (out, *vjp(dout.astype(out.dtype)))]

    kernel = value_and_grads(jax.jit(lambda a, b: hopper_gmm(a, b, sizes)), lhs, rhs)
    with jax.default_matmul_precision("highest"):
        exact = value_and_grads(
            jax.jit(lambda a, b: grouped_matmul(a, b, sizes, 64)),
            lhs.astype(jnp.float32), rhs.astype(jnp.float32),
        )  # fmt: skip
    for got, want in zip(kernel, exact, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-2 * np.abs(want).max(), rtol=2e-2)
    assert not np.any(kernel[0][940:])  # rows past the groups come out zero
    assert not np.any(kernel[2][1])  # the empty group's gradient is zero


def test_hopper_experts_are_as_close_to_fp32_as_the_plain_bf16_path():
    """The routed experts through MoE under bf16: kernels='cuda' (the Mosaic GPU kernel, in
    the program) and 'plain', each against the fp32 plain result, values and gradients."""
    x = jnp.asarray(np.random.RandomState(2).randn(B, T, CFG.hidden_size).astype(np.float32))
    params = jax.jit(MoE(CFG).init)(jax.random.key(3), x)["params"]

    def f(kernels, dtype):
        def loss(p, x):
            y, _ = MoE(CFG.replace(kernels=kernels, dtype=dtype)).apply({"params": p}, x)
            return jnp.sum(y * jnp.cos(y)), y

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        (_, y), grads = fn(params, x.astype(dtype))
        return fn, [np.asarray(v, np.float32) for v in (y, *jax.tree.leaves(grads))]

    with jax.default_matmul_precision("highest"):
        _, exact = f("plain", "float32")
    fused, kernel = f("cuda", "bfloat16")
    _, plain = f("plain", "bfloat16")
    assert "mosaic_gpu" in fused.lower(params, x.astype(jnp.bfloat16)).as_text()
    for got, ref, want in zip(kernel, plain, exact, strict=True):
        err_kernel, err_plain = np.abs(got - want).max(), np.abs(ref - want).max()
        assert err_kernel <= 2 * err_plain + 1e-3 * np.abs(want).max(), (err_kernel, err_plain)


def test_greedy_generation_on_the_gpu_equals_the_cpu():
    cfg = CFG.replace(dtype="float32")
    params = jax.jit(dj.init_params, static_argnums=0)(cfg, jax.random.key(4))
    prompts = np.random.RandomState(5).randint(0, cfg.vocab_size, (3, 12))
    gpu = np.asarray(dj.generate(cfg, params, prompts, max_new_tokens=24))
    with jax.default_device(jax.devices("cpu")[0]):
        cpu_params = jax.device_put(params, jax.devices("cpu")[0])
        cpu = np.asarray(dj.generate(cfg, cpu_params, prompts, max_new_tokens=24))
    np.testing.assert_array_equal(gpu, cpu)
