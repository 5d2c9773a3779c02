"""HF/PyTorch DeepSeek-V2 checkpoints in and out: the one table from our names to theirs.

    cfg, params = load_hf("DeepSeek-V2-Lite", dtype="bfloat16")
    save_hf("out_dir", cfg, params)

Our parameters use the paper's names and stack layers (and experts) on leading axes; the
published checkpoints use the hub key names, one tensor per layer and per expert, PyTorch's
[out, in] Linear layout, and fuse some of the paper's matrices into one tensor (q_b_proj holds
W_UQ and W_QR per head; kv_a_proj_with_mqa holds W_DKV and W_KR; kv_b_proj holds W_UK and W_UV
per head). `RULES` says, for each HF tensor of a layer, which of our arrays it holds and how to
split and join it. Loading streams: each HF tensor is memory-mapped, split, cast and written
into its slot of the preallocated result.

Legend: D model width, H heads, N nope dim, R rope dim, V value dim, C kv latent, Q q latent,
E experts, I expert width.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from deepseek_jax.checkpoint.safetensors_io import ShardedWriter, TensorDirectory
from deepseek_jax.config import ModelConfig
from deepseek_jax.model.transformer import init_params

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}

# Buffers some exporters save; they are recomputed from the config, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF tensor of a layer <-> one or more of our arrays (one layer's/expert's slice)."""

    hf: str  # key under "model.layers.{i}.", "{j}" for the expert index
    ours: tuple[str, ...]  # our param paths inside a layer stack, "/"-separated
    split: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # HF tensor -> our slices
    join: Callable[..., np.ndarray]  # our slices -> HF tensor


def linear(hf: str, ours: str) -> Rule:
    """nn.Linear weight [out, in] <-> our [in, out]."""
    return Rule(hf, (ours,), lambda w: (w.T,), lambda a: a.T)


def norm(hf: str, ours: str) -> Rule:
    return Rule(hf, (ours,), lambda w: (w,), lambda a: a)


def per_head(hf: str, ours: tuple[str, ...], heads: int, sizes: tuple[int, ...]) -> Rule:
    """[H * sum(sizes), In] with per-head blocks [a | b] <-> our [In, H, a] and [In, H, b]."""
    cuts = np.cumsum(sizes)[:-1]

    def split(w):
        blocks = np.split(w.reshape(heads, sum(sizes), -1), cuts, axis=1)  # H a In, H b In
        return tuple(b.transpose(2, 0, 1) for b in blocks)

    def join(*arrays):
        blocks = [a.transpose(1, 2, 0) for a in arrays]
        return np.concatenate(blocks, axis=1).reshape(heads * sum(sizes), -1)

    return Rule(hf, ours, split, join)


def stacked_rows(hf: str, ours: tuple[str, ...], sizes: tuple[int, ...]) -> Rule:
    """[a + b, In] <-> our [In, a] and [In, b]."""
    cuts = np.cumsum(sizes)[:-1]
    return Rule(
        hf,
        ours,
        lambda w: tuple(p.T for p in np.split(w, cuts, axis=0)),
        lambda *arrays: np.concatenate([a.T for a in arrays], axis=0),
    )


def output_projection(hf: str, ours: str, heads: int, v: int) -> Rule:
    """o_proj [D, H * V] <-> our w_o [H, V, D]."""
    return Rule(
        hf,
        (ours,),
        lambda w: (w.reshape(w.shape[0], heads, v).transpose(1, 2, 0),),
        lambda a: a.transpose(2, 0, 1).reshape(a.shape[2], -1),
    )


def swiglu_rules(hf_prefix: str, ours_prefix: str) -> list[Rule]:
    return [
        linear(f"{hf_prefix}.{hf}_proj.weight", f"{ours_prefix}/w_{ours}")
        for hf, ours in (("gate", "gate"), ("up", "up"), ("down", "down"))
    ]


def layer_rules(cfg: ModelConfig, moe: bool) -> list[Rule]:
    """Every HF tensor of one decoder layer and where it lives in our layer params."""
    h, n, r, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    rules = [
        norm("input_layernorm.weight", "attn_norm/scale"),
        norm("post_attention_layernorm.weight", "mlp_norm/scale"),
        stacked_rows(
            "self_attn.kv_a_proj_with_mqa.weight",
            ("attn/w_dkv", "attn/w_kr"),
            (cfg.kv_lora_rank, r),
        ),
        norm("self_attn.kv_a_layernorm.weight", "attn/kv_norm/scale"),
        per_head("self_attn.kv_b_proj.weight", ("attn/w_uk", "attn/w_uv"), h, (n, v)),
        output_projection("self_attn.o_proj.weight", "attn/w_o", h, v),
    ]
    queries = ("attn/w_uq", "attn/w_qr")
    if cfg.q_lora_rank is None:
        rules.append(per_head("self_attn.q_proj.weight", queries, h, (n, r)))
    else:
        rules += [
            linear("self_attn.q_a_proj.weight", "attn/w_dq"),
            norm("self_attn.q_a_layernorm.weight", "attn/q_norm/scale"),
            per_head("self_attn.q_b_proj.weight", queries, h, (n, r)),
        ]
    if not moe:
        return rules + swiglu_rules("mlp", "mlp")
    rules += swiglu_rules("mlp.experts.{j}", "mlp")
    rules.append(linear("mlp.gate.weight", "mlp/centroids"))
    if cfg.n_shared_experts:
        rules += swiglu_rules("mlp.shared_experts", "mlp/shared")
    return rules


def stacks(cfg: ModelConfig) -> list[tuple[str, bool, range]]:
    """(our stack name, is MoE, HF layer indices) for the dense then the MoE layers."""
    k, total = cfg.first_k_dense_replace, cfg.num_hidden_layers
    return [
        (name, moe, layers)
        for name, moe, layers in (
            ("dense_layers", False, range(0, k)),
            ("moe_layers", True, range(k, total)),
        )
        if len(layers)
    ]


def top_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [
        norm("model.embed_tokens.weight", "embed/embedding"),
        norm("model.norm.weight", "final_norm/scale"),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(linear("lm_head.weight", "lm_head"))
    return rules


def get_path(tree: dict, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def expert_slots(rule: Rule, cfg: ModelConfig) -> range:
    return range(cfg.n_routed_experts) if "{j}" in rule.hf else range(1)


def load_hf(path: str | os.PathLike, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """Reads an HF DeepSeek-V2 checkpoint dir into (ModelConfig, params).

    dtype: "float32" or "bfloat16" for the params (and cfg.param_dtype); None keeps the
    checkpoint's own (bf16 for the published weights). Peak host memory is the result plus
    one checkpoint tensor: every HF tensor is memory-mapped and copied into its slot.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected an HF checkpoint dir)")
    tensors = TensorDirectory(path)
    cfg = ModelConfig.from_hf(path)
    if dtype is None:
        first = tensors[next(iter(sorted(tensors.keys())))]
        dtype = "bfloat16" if first.dtype == NP_DTYPES["bfloat16"] else "float32"
    if dtype not in NP_DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(NP_DTYPES)}")
    cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    np_dtype = NP_DTYPES[dtype]

    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    result = jax.tree.map(lambda s: np.empty(s.shape, np_dtype), shapes)
    used: set[str] = set()

    def fill(hf_key: str, rule: Rule, target: dict, index: tuple[int, ...]):
        if hf_key not in tensors.keys():
            raise KeyError(f"{path}: missing tensor {hf_key!r} (config {cfg_summary(cfg)})")
        hf_array = tensors[hf_key]
        slots = [get_path(target, p) for p in rule.ours]
        try:
            pieces = rule.split(hf_array)
            ok = all(p.shape == s[index].shape for p, s in zip(pieces, slots, strict=True))
        except ValueError:
            ok = False
        if not ok:
            wanted = [s[index].shape for s in slots]
            raise ValueError(
                f"{path}: tensor {hf_key!r} has shape {tuple(hf_array.shape)}, which does not "
                f"fit our {rule.ours} of shapes {wanted} under config.json"
            )
        for piece, slot in zip(pieces, slots, strict=True):
            slot[index] = piece.astype(np_dtype)
        used.add(hf_key)

    work = [
        (rule, stack, moe, layer, local)
        for stack, moe, layers in stacks(cfg)
        for local, layer in enumerate(layers)
        for rule in layer_rules(cfg, moe)
    ]
    for rule in top_rules(cfg):
        fill(rule.hf, rule, result, ())
    for rule, stack, _, layer, local in tqdm(work, desc=f"loading {path}", leave=False):
        for j in expert_slots(rule, cfg):
            index = (local, j) if "{j}" in rule.hf else (local,)
            fill(f"model.layers.{layer}.{rule.hf.format(j=j)}", rule, result[stack], index)

    unexpected = sorted(k for k in tensors.keys() - used if not k.endswith(IGNORED_SUFFIXES))
    if cfg.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # a tied head saved anyway: it equals the embedding
    if unexpected:
        raise ValueError(
            f"{path}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            f" ({len(unexpected)} in all): the checkpoint does not match its config.json"
        )
    # One leaf at a time, so the numpy copy of a leaf is freed as its device copy is made.
    # Blocking matters: an unfinished device_put keeps its host array alive until the next
    # garbage collection (jax 0.10.2, measured), which would hold the whole result twice.
    leaves, treedef = jax.tree.flatten(result)
    del result
    arrays = []
    while leaves:
        arrays.append(jax.device_put(leaves.pop(0)).block_until_ready())
    return cfg, jax.tree.unflatten(treedef, arrays)


def save_hf(
    path: str | os.PathLike,
    cfg: ModelConfig,
    params: dict,
    dtype: str | None = None,
    max_shard_bytes: int = 5 << 30,
) -> None:
    """Writes params as an HF DeepSeek-V2 checkpoint dir (config.json + safetensors shards),
    loadable by transformers' `from_pretrained` and by `load_hf`. One tensor in memory at a time."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    dtype = dtype or cfg.param_dtype
    if dtype not in NP_DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(NP_DTYPES)}")
    np_dtype = NP_DTYPES[dtype]
    writer = ShardedWriter(path, max_shard_bytes)

    def emit(hf_key: str, rule: Rule, source: dict, index: tuple[int, ...]):
        slices = [np.asarray(get_path(source, p)[index]) for p in rule.ours]
        writer.add(hf_key, rule.join(*slices).astype(np_dtype))

    for rule in top_rules(cfg):
        emit(rule.hf, rule, params, ())
    for stack, moe, layers in stacks(cfg):
        for local, layer in enumerate(tqdm(layers, desc=f"saving {path}", leave=False)):
            for rule in layer_rules(cfg, moe):
                for j in expert_slots(rule, cfg):
                    index = (local, j) if "{j}" in rule.hf else (local,)
                    key = f"model.layers.{layer}.{rule.hf.format(j=j)}"
                    emit(key, rule, params[stack], index)
    writer.close()
    hf_config = cfg.to_hf()
    hf_config["dtype"] = dtype
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)


def cfg_summary(cfg: ModelConfig) -> str:
    return (
        f"{cfg.num_hidden_layers} layers, D={cfg.hidden_size}, E={cfg.n_routed_experts}, "
        f"q_lora_rank={cfg.q_lora_rank}"
    )
