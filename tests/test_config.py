"""ModelConfig: validation, presets, HF config.json in and out, the paper's parameter table."""

import dataclasses
import json

import pytest
from hf_models import GROUP_LIMITED, YARN, hf_config

from deepseek_jax import config, sizes
from deepseek_jax.config import ModelConfig
from deepseek_jax.errors import UserError


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(num_experts_per_tok=7, topk_group=1), "num_experts_per_tok"),  # 7 > 1 group x 4
        (dict(n_group=3), "n_routed_experts"),
        (dict(topk_method="noaux_tc"), "topk_method"),
        (dict(qk_rope_head_dim=33), "qk_rope_head_dim"),
        (dict(topk_group=9), "topk_group"),
        (dict(first_k_dense_replace=99), "first_k_dense_replace"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(dtype="fp8"), "dtype"),
        (dict(remat_policy="sometimes"), "remat_policy"),
        (dict(scan_unroll=0), "scan_unroll"),
    ],
)
def test_invalid_values_name_the_field(changes, field):
    base = config.tiny().replace(n_routed_experts=16, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match=field):
        base.replace(**changes)


def test_qk_dims_must_add_up():
    hf = hf_config().to_dict()
    hf["qk_head_dim"] = hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"] + 1
    with pytest.raises(ValueError, match="qk_head_dim"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("rope", [None, YARN])
def test_hf_round_trip(rope):
    overrides = dict(q_lora_rank=24, **GROUP_LIMITED)
    if rope:
        overrides["rope_parameters"] = rope
    cfg = ModelConfig.from_hf(hf_config(**overrides).to_dict())
    assert cfg.topk_group == 2 and cfg.q_lora_rank == 24 and cfg.routed_scaling_factor == 2.5
    assert (cfg.rope_scaling is None) == (rope is None)
    if rope:
        assert cfg.rope_scaling.mscale == 0.8 and cfg.rope_scaling.mscale_all_dim == 0.6
    assert ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


# DeepSeek-V2-Lite-Chat's config.json as published (auto_map left out), the form vLLM reads.
PUBLISHED_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}


def test_published_config_reads_as_the_preset():
    """The published `rope_scaling` form and every key of the real file are understood."""
    cfg = ModelConfig.from_hf(PUBLISHED_LITE)
    assert cfg.architecture_difference(config.v2_lite()) is None
    assert cfg.rope_scaling == config.v2().rope_scaling and cfg.initializer_range == 0.02


def test_to_hf_writes_the_published_form():
    hf = config.v2().to_hf()
    assert "rope_parameters" not in hf and hf["rope_theta"] == 10000.0
    assert hf["rope_scaling"]["type"] == "yarn" and hf["rope_scaling"]["mscale"] == 0.707
    assert hf["num_key_value_heads"] == 128 and hf["moe_layer_freq"] == 1
    assert ModelConfig.from_hf(json.loads(json.dumps(hf))) == config.v2()


@pytest.mark.parametrize(
    "key, value",
    [
        ("moe_layer_freq", 2),
        ("hidden_act", "gelu"),
        ("attention_bias", True),
        ("mlp_bias", True),
        ("scoring_func", "sigmoid"),
        ("num_key_value_heads", 1),
        ("quantization_config", {"quant_method": "fp8"}),  # in no table: refused, not ignored
    ],
)
def test_unsupported_hf_field_is_refused_by_name(key, value):
    with pytest.raises(UserError, match=f"^config.json: (field )?'?{key}") as error:
        ModelConfig.from_hf({**PUBLISHED_LITE, key: value})
    assert "\n" not in str(error.value)


def test_one_table_tags_every_field():
    """A field added to ModelConfig must get a row (its kind, its HF key) in config.HF_FIELDS."""
    assert [row.name for row in config.HF_FIELDS] == [
        f.name for f in dataclasses.fields(ModelConfig)
    ]
    assert set(config.KINDS.values()) == {"architecture", "execution"}


def test_architecture_compares_architecture_only():
    base = config.tiny()
    execution = dict(
        scan_unroll=4, remat_policy="full", dtype="bfloat16", capacity_factor=1.25,
        initializer_range=0.02, aux_loss_alpha2=0.05,
    )  # fmt: skip
    assert base.architecture_difference(base.replace(**execution)) is None
    assert base.replace(hidden_size=128, n_routed_experts=8).architecture_difference(base) == (
        "hidden_size: 128 vs 256"
    )


def test_dict_round_trip_and_unknown_field():
    cfg = config.small()
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="n_experts"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_experts": 3})


def test_presets_are_hashable_static_args():
    for name in config.PRESETS:
        hash(config.preset(name))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.v2().hidden_size = 1


def test_paper_parameter_table():
    """Paper table 1 / abstract: V2 236B total, 21B active; V2-Lite 15.7B, 2.4B active."""
    v2 = sizes.param_counts(config.v2())
    assert abs(v2["total"] / 235.7e9 - 1) < 0.005
    assert abs(v2["active"] / 21e9 - 1) < 0.03
    lite = sizes.param_counts(config.v2_lite())
    assert abs(lite["total"] / 15.7e9 - 1) < 0.005
    assert abs(lite["active"] / 2.4e9 - 1) < 0.03
    small = sizes.param_counts(config.small())
    assert 80e6 < small["total"] < 150e6


def test_latent_cache_is_576_numbers_for_v2():
    cfg = config.v2()
    assert cfg.latent_cache_dim == 576
    assert sizes.cache_bytes_per_token(cfg)["latent"] == 60 * 576 * 2


def test_cli_prints_summary(capsys):
    sizes.main(["--preset", "v2"])
    out = capsys.readouterr().out
    assert "235.74" in out and "69,120 bytes/token" in out
