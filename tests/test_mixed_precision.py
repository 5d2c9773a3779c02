"""Mixed precision (issue 16, point 5): the compute dtype "auto" resolves per platform (bf16
for TPU and GPU, fp32 on the CPU); under bf16 compute the master params stay fp32 and the
router, the norms, softmax, log-softmax and the loss run in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dj
from deepseek_jax.config import resolve_dtype
from deepseek_jax.errors import UserError
from deepseek_jax.train import losses

CFG = dj.preset("tiny").replace(num_hidden_layers=2, initializer_range=0.05)
TOKENS = np.random.RandomState(0).randint(0, 256, (2, 24))


@pytest.fixture(scope="module")
def params():
    return jax.jit(dj.init_params, static_argnums=0)(CFG, jax.random.key(0))


def test_auto_resolves_per_platform():
    assert CFG.dtype == "auto"
    assert resolve_dtype(CFG, "cpu").dtype == "float32"
    for platform in ("tpu", "gpu", "cuda", "rocm"):  # device and jax.export names
        assert resolve_dtype(CFG, platform).dtype == "bfloat16"
    assert resolve_dtype(CFG).dtype == "float32"  # this host's backend
    assert resolve_dtype(CFG, dj.make_mesh()).dtype == "float32"  # a mesh's devices
    explicit = CFG.replace(dtype="bfloat16")
    assert resolve_dtype(explicit, "cpu") is explicit
    with pytest.raises(UserError, match="param_dtype='auto'"):
        CFG.replace(param_dtype="auto")


def test_auto_on_the_cpu_is_float32(params):
    """The consumers see a concrete dtype: the model computes, and the cache holds, fp32."""
    out = jax.eval_shape(lambda p: dj.DeepSeekV2(CFG).apply({"params": p}, TOKENS), params)
    assert out.logits.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(dj.init_cache(CFG, 2, 8))} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}


def equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it (scan bodies, remat, custom
    derivative rules)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def loss(cfg, params):
    logits = dj.DeepSeekV2(cfg).apply({"params": params}, TOKENS).logits
    return losses.nll_sum(logits, TOKENS, jnp.ones(TOKENS.shape)), logits


def test_bfloat16_compute_keeps_the_sensitive_parts_in_float32(params):
    """Forward and backward under dtype bfloat16: the matmuls run in bf16 (so this can fail),
    while every exp, log and rsqrt (softmax, log-softmax, RMSNorm) and the router's scores
    run in float32, and the gradients of the fp32 master params are fp32."""
    bf16 = CFG.replace(dtype="bfloat16")
    grad = jax.value_and_grad(lambda p: loss(bf16, p), has_aux=True)
    traced = jax.make_jaxpr(grad)(params)
    eqns = list(equations(traced.jaxpr))

    def dtypes(eqn):
        return {str(v.aval.dtype) for v in (*eqn.invars, *eqn.outvars) if hasattr(v, "aval")}

    dots = [dtypes(e) for e in eqns if e.primitive.name == "dot_general"]
    assert sum("bfloat16" in d for d in dots) > len(dots) // 2, dots
    for name in ("exp", "log", "rsqrt"):
        found = [dtypes(e) for e in eqns if e.primitive.name == name]
        assert found and all(d == {"float32"} for d in found), (name, found)
    router = [
        dtypes(e)
        for e in eqns
        if "router" in str(e.source_info.name_stack) and e.primitive.name == "dot_general"
    ]
    assert router and all(d == {"float32"} for d in router), router

    value, logits16, *grads = traced.out_avals
    assert logits16.dtype == jnp.bfloat16 and value.dtype == jnp.float32
    assert {x.dtype for x in grads} == {jnp.dtype("float32")}

    _, logits16 = jax.jit(lambda p: loss(bf16, p))(params)
    _, logits32 = jax.jit(lambda p: loss(CFG, p))(params)
    error = np.asarray(logits16, np.float32) - np.asarray(logits32)
    # bf16 keeps 8 significant bits per rounding; a token whose router flips between two
    # near-tied experts differs more, so the bound is on the whole: measured 1.6%.
    relative = np.linalg.norm(error) / np.linalg.norm(np.asarray(logits32))
    assert 0 < relative <= 2**-5, relative


def test_float32_compute_means_float32_matmuls(params):
    """fp32 compute lowers every matmul, forward and backward (the experts' custom VJP too),
    at "highest": a GPU's default would take TF32 inputs (5.7e-3 off transformers' logits on
    an H200, 2.8e-6 at "highest"). 16-bit compute keeps the default."""

    def dots(dtype):
        cfg = CFG.replace(dtype=dtype)
        loss = lambda p: jnp.sum(dj.DeepSeekV2(cfg).apply({"params": p}, TOKENS).logits)  # noqa: E731
        text = jax.jit(jax.grad(loss)).lower(params).as_text()
        return [line for line in text.splitlines() if "stablehlo.dot_general" in line]

    fp32 = dots("float32")
    assert fp32 and all("precision = [HIGHEST, HIGHEST]" in d for d in fp32)
    assert not any("HIGHEST" in d for d in dots("bfloat16"))
