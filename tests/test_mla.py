"""MLA alone against transformers' DeepseekV2Attention on the same weights; RoPE/YaRN constants.

The weights reach our module through `load_hf` (the one rules table), so a wrong split of
q_b_proj / kv_a_proj_with_mqa / kv_b_proj shows here, one layer deep, before the end-to-end
logits test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import YARN, build_hf, hf_config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
    DeepseekV2Attention,
    DeepseekV2RotaryEmbedding,
)

import deepseek_jax as dj
from deepseek_jax.model.mla import MLA
from deepseek_jax.model.rope import inv_frequencies, rope_cos_sin, softmax_scale

# The published V2 rope: factor 40 over an original 4096 context, mscale 0.707 both ways.
V2_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

VARIANTS = {
    "plain": dict(),
    "q_lora": dict(q_lora_rank=24),
    # original context 16: positions up to 16 + 40 + 24 lie far past it.
    "yarn_q_lora": dict(q_lora_rank=24, rope_parameters=YARN),
    "yarn_no_q_lora": dict(rope_parameters=YARN),
}


def causal_additive_mask(t: int) -> torch.Tensor:
    """[1, 1, T, T] float mask for HF eager attention: 0 where visible, -inf above the diagonal."""
    return torch.full((t, t), float("-inf")).triu(1)[None, None]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_mla_matches_hf_attention(tmp_path, name):
    """Expanded (prefill) and absorbed (decode, latent cache) forms both equal HF's attention,
    on the plain path and in blocks of 16 keys (and queries), out to position 63."""
    hf_model = build_hf(tmp_path, num_hidden_layers=1, **VARIANTS[name])
    cfg, params = dj.load_hf(tmp_path)
    attn_params = jax.tree.map(lambda a: a[0], params["dense_layers"]["attn"])  # layer 0
    b, t, offset = 2, 64, 40
    x = np.random.RandomState(0).randn(b, t, cfg.hidden_size).astype(np.float32)
    positions = np.broadcast_to(np.arange(t), (b, t))

    with torch.no_grad():
        x_pt, pos_pt = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(positions))
        freqs = hf_model.model.rotary_emb(x_pt, pos_pt)
        expected, _ = hf_model.model.layers[0].self_attn(
            x_pt, attention_mask=causal_additive_mask(t), position_embeddings=freqs
        )
    expected = expected.numpy()

    cos, sin = rope_cos_sin(cfg, jnp.asarray(positions))
    for block in (None, 16):
        mla = MLA(cfg.replace(attention_block_size=block))
        ours, latents = mla.apply({"params": attn_params}, x, cos, sin, jnp.asarray(positions))
        np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5, rtol=0)
        assert latents.shape == (b, t, cfg.latent_cache_dim)

        # Decode form: the first `offset` latents are in the cache (slot index = position),
        # the last t - offset tokens are written at their positions and read it all back.
        cache = (
            jnp.zeros((b, t, cfg.latent_cache_dim), jnp.float32)
            .at[:, :offset]
            .set(latents[:, :offset])
        )
        new = slice(offset, t)
        absorbed, cache = mla.apply(
            {"params": attn_params},
            x[:, new],
            cos[:, new],
            sin[:, new],
            jnp.asarray(positions[:, new]),
            cache=cache,
        )
        np.testing.assert_allclose(np.asarray(absorbed), expected[:, new], atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(cache), np.asarray(latents), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "rope", [YARN, V2_YARN, {"rope_type": "default", "rope_theta": 10000.0}], ids=str
)
def test_rope_constants_match_hf(rope):
    """Inverse frequencies, the cos/sin attention factor and the softmax scale equal HF's."""
    hf_cfg = hf_config(
        rope_parameters=dict(rope),
        max_position_embeddings=163840,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
    )
    cfg = dj.ModelConfig.from_hf(hf_cfg.to_dict())
    rope_type = rope["rope_type"]
    if rope_type == "default":
        hf_inv, hf_factor = DeepseekV2RotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        hf_inv, hf_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg)
    np.testing.assert_allclose(np.asarray(inv_frequencies(cfg)), hf_inv.numpy(), rtol=1e-6)

    # Small positions: at large ones a one-ulp difference in a frequency moves the angle by more
    # than the tolerance (far positions are covered, end to end, by the MLA test above).
    positions = jnp.asarray([[0, 1, 3, 17]])
    cos, sin = rope_cos_sin(cfg, positions)
    angles = np.asarray(positions, np.float32)[..., None] * hf_inv.numpy()
    np.testing.assert_allclose(np.asarray(cos), np.cos(angles) * hf_factor, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sin), np.sin(angles) * hf_factor, atol=1e-5)

    hf_attention = DeepseekV2Attention(hf_cfg, layer_idx=0)
    assert softmax_scale(cfg) == pytest.approx(hf_attention.scaling, rel=1e-12)
