"""A V2-Lite-structured checkpoint on 8 fake CPU devices (issue 13 point 7).
`tests/test_checkpoint_mesh.py` runs this file in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count is fixed when jax starts).

The model has V2-Lite's structure: 27 layers (1 dense), 64 routed experts + 2 shared, top-6
greedy, no q compression, 16 heads, with widths cut so that it runs on the CPU, saved by
transformers in several safetensors shards with a chat tokenizer beside it.
"""

import json
import os

import jax
import numpy as np
import pytest
import transformers
from hf_models import build_hf, hf_logits, save_chat_tokenizer
from train_helpers import CACHE, typed, write_additions

import deepseek_jax as dj
from deepseek_jax.checkpoint import orbax as ckpt
from deepseek_jax.checkpoint.convert import main as convert_main
from deepseek_jax.configs import base_config
from deepseek_jax.errors import UserError
from deepseek_jax.rl import sft

if jax.device_count() != 8:
    pytest.skip(
        "needs 8 devices: run through tests/test_checkpoint_mesh.py", allow_module_level=True
    )

LITE = dict(
    vocab_size=320,
    hidden_size=64,
    num_hidden_layers=27,
    num_attention_heads=16,
    q_lora_rank=None,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    intermediate_size=96,
    moe_intermediate_size=16,
    n_routed_experts=64,
    n_shared_experts=2,
    num_experts_per_tok=6,
    topk_method="greedy",
    first_k_dense_replace=1,
    routed_scaling_factor=1.0,
    max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    """(directory, transformers model, mesh, cfg, params on the mesh)."""
    directory = tmp_path_factory.mktemp("lite")
    model = build_hf(directory / "tmp", **LITE)
    model.save_pretrained(directory, max_shard_size="400KB")  # several shards and an index
    save_chat_tokenizer(directory, vocab_size=300)
    mesh = dj.make_mesh(expert=8)
    cfg, params = dj.load_hf(directory, mesh=mesh)
    return directory, model, mesh, cfg, params


def test_loads_sharded_and_matches_transformers(lite):
    directory, model, mesh, cfg, params = lite
    shards = [n for n in os.listdir(directory) if n.endswith(".safetensors")]
    assert len(shards) >= 3 and cfg.num_hidden_layers == 27
    w_up = params["moe_layers"]["mlp"]["w_up"]  # [L, E, D, I]: experts split 8 ways
    assert w_up.sharding.shard_shape(w_up.shape)[1] == 64 // 8
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 24))
    ours = dj.DeepSeekV2(cfg, mesh=mesh).apply({"params": params}, tokens).logits
    np.testing.assert_allclose(np.asarray(ours), hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_greedy_tokens_sharded_equal_unsharded(lite):
    """3 ragged prompts on a mesh whose batch axes span 8 devices: padded, not replicated."""
    directory, _, mesh, cfg, params = lite
    prompts = [[1, 5, 9, 30], [7, 7], [100, 3, 4, 5, 6, 8]]
    sharded = dj.generate(cfg, params, prompts, max_new_tokens=8, mesh=mesh)
    _, plain_params = dj.load_hf(directory)
    plain = dj.generate(cfg, plain_params, prompts, max_new_tokens=8)
    assert sharded.shape == (3, 8)
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(plain))


def test_saved_from_the_mesh_reloads_in_transformers(lite, tmp_path):
    directory, model, mesh, cfg, params = lite
    dj.save_hf(tmp_path, cfg, params, max_shard_bytes=300_000, tokenizer=directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / name).exists(), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_scaling" in config and "rope_theta" in config  # the published form
    reloaded = transformers.DeepseekV2ForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 24))
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))


def test_two_sft_steps_from_the_checkpoint(lite, tmp_path):
    """train.init_from=the HF dir: the run starts from its weights (a tiny rate keeps the
    trained params within 1e-3 of them, where a random init is ~0.1 away) on expert=8."""
    directory, _, _, cfg, params = lite
    config = base_config("tiny")
    config.mode = "sft"
    config.model = cfg.replace(capacity_factor=None, scan_unroll=1).to_dict()
    config.mesh.expert = 8
    config.data.source = "chat"
    config.data.path = write_additions(tmp_path / "chats.jsonl", n=64)
    config.data.text_field = "messages"
    config.data.tokenizer = str(directory)
    config.data.seq_len = 32
    config.data.holdout_fraction = 0.25
    config.optimizer.learning_rate = 1e-5
    config.optimizer.warmup_steps = 0
    config.train.steps = 2
    config.train.batch_size = 8
    config.train.eval_every = 2
    config.train.eval_batches = 1
    config.train.save_every = 2
    config.train.run_dir = str(tmp_path / "run")
    config.train.compilation_cache = CACHE
    config.train.init_from = str(directory)
    result = sft.run(typed(config))
    assert np.isfinite(result["eval_loss"])
    _, trained = ckpt.load_params(config.train.run_dir)
    distance = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), trained, params
    )
    assert 0 < max(jax.tree.leaves(distance)) < 1e-3, distance


def test_a_mesh_that_does_not_divide_is_named(tmp_path):
    build_hf(tmp_path, num_hidden_layers=2)  # 4 heads on "tensor" of 8
    with pytest.raises(UserError) as error:
        dj.load_hf(tmp_path, mesh=dj.make_mesh(tensor=8))
    message = str(error.value)
    assert "attn/w_o of shape (1, 4, 12, 64): dimension 1 (4)" in message, message
    assert "('tensor',) of 8 devices" in message, message
    assert "\n" not in message


def test_convert_streams_both_ways_on_the_mesh(lite, tmp_path):
    """convert --mesh expert=8: HF -> orbax -> HF, the params read onto the mesh each way."""
    directory, _, _, cfg, params = lite
    convert_main([str(directory), str(tmp_path / "orbax"), "--mesh", "expert=8"])
    convert_main([str(tmp_path / "orbax"), str(tmp_path / "hf"), "--mesh", "expert=8"])
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    back_cfg, back = dj.load_hf(tmp_path / "hf")
    assert back_cfg.architecture_difference(cfg) is None
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
