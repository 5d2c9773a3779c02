"""End-to-end logits against transformers' DeepseekV2ForCausalLM (docs/design.md 2), fp32."""

import numpy as np
import pytest
import transformers
from hf_models import GROUP_LIMITED, YARN, build_hf, hf_logits

import deepseek_jax as dj

VARIANTS = {
    "plain_greedy": dict(),
    "q_lora": dict(q_lora_rank=24),
    "group_limited_scaled": GROUP_LIMITED,
    # original context 16, T = 64: positions far past it exercise the YaRN ramp and mscale.
    "yarn_q_lora": dict(q_lora_rank=24, rope_parameters=YARN),
    "tied_two_dense": dict(tie_word_embeddings=True, first_k_dense_replace=2, n_shared_experts=2),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, name):
    hf_model = build_hf(tmp_path, **VARIANTS[name])
    cfg, params = dj.load_hf(tmp_path)
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (3, 64))
    ours = np.asarray(dj.DeepSeekV2(cfg).apply({"params": params}, tokens).logits)
    np.testing.assert_allclose(ours, hf_logits(hf_model, tokens), atol=1e-4, rtol=0)


def test_save_hf_round_trip_through_transformers(tmp_path):
    """Our params -> save_hf -> transformers from_pretrained gives our logits."""
    cfg = dj.preset("tiny").replace(
        vocab_size=80,
        num_hidden_layers=3,
        q_lora_rank=32,
        rope_scaling=dj.YarnConfig(
            factor=4.0, original_max_position_embeddings=16, mscale=0.9, mscale_all_dim=0.7
        ),
        max_position_embeddings=64,
        routed_scaling_factor=1.5,
        initializer_range=0.05,
    )
    import jax

    params = jax.jit(dj.init_params, static_argnums=0)(cfg, jax.random.key(3))
    dj.save_hf(tmp_path, cfg, params)
    hf_model = transformers.DeepseekV2ForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    tokens = np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 64))
    ours = np.asarray(dj.DeepSeekV2(cfg).apply({"params": params}, tokens).logits)
    np.testing.assert_allclose(ours, hf_logits(hf_model, tokens), atol=1e-4, rtol=0)
