"""ModelConfig: validation, presets, HF config.json in and out, the paper's parameter table."""

import dataclasses
import json

import pytest
from hf_models import YARN, hf_config

from deepseek_jax import config, sizes
from deepseek_jax.config import ModelConfig


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
    overrides = dict(
        q_lora_rank=24,
        topk_method="group_limited_greedy",
        n_routed_experts=16,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        routed_scaling_factor=2.5,
    )
    if rope:
        overrides["rope_parameters"] = rope
    cfg = ModelConfig.from_hf(hf_config(**overrides).to_dict())
    assert cfg.topk_group == 2 and cfg.q_lora_rank == 24 and cfg.routed_scaling_factor == 2.5
    assert (cfg.rope_scaling is None) == (rope is None)
    if rope:
        assert cfg.rope_scaling.mscale == 0.8 and cfg.rope_scaling.mscale_all_dim == 0.6
    assert ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


def test_legacy_rope_scaling_field():
    """Published checkpoints' config.json: `rope_scaling` with "type", rope_theta at the top."""
    hf = config.v2().to_hf()
    del hf["rope_parameters"]
    hf["rope_theta"] = 10000
    hf["rope_scaling"] = {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    }
    assert ModelConfig.from_hf(hf).rope_scaling == config.v2().rope_scaling


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
