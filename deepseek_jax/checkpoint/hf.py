"""HF/PyTorch DeepSeek-V2 checkpoints in and out: the one table from our names to theirs.

    cfg, params = load_hf("DeepSeek-V2-Lite", dtype="bfloat16")
    save_hf("out_dir", cfg, params)

Our parameters use the paper's names and stack layers (and experts) on leading axes; the
published checkpoints use the hub key names, one tensor per layer and per expert, PyTorch's
[out, in] Linear layout, and fuse some of the paper's matrices into one tensor (q_b_proj holds
W_UQ and W_QR per head; kv_a_proj_with_mqa holds W_DKV and W_KR; kv_b_proj holds W_UK and W_UV
per head). `RULES` says, for each HF tensor of a layer, which of our arrays it holds and how to
split and join it. Loading streams: every leaf is born on its devices (`read_leaf`), each
block read from the memory-mapped HF tensors it overlaps; saving gathers one tensor at a time.

Legend: D model width, H heads, N nope dim, R rope dim, V value dim, C kv latent, Q q latent,
E experts, I expert width.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from deepseek_jax.checkpoint.hub import local_dir
from deepseek_jax.checkpoint.safetensors_io import ShardedWriter, TensorDirectory
from deepseek_jax.config import ModelConfig
from deepseek_jax.errors import UserError
from deepseek_jax.model.transformer import init_params
from deepseek_jax.parallel.placement import param_shardings

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


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one of our leaves comes from: piece `piece` of `rule.split` of one HF tensor per
    layer of `layers` (and per expert), or of one top-level tensor (layers None)."""

    rule: Rule
    piece: int
    layers: range | None

    def key(self, layer: int | None, expert: int | None) -> str:
        if self.layers is None:
            return self.rule.hf
        return f"model.layers.{layer}.{self.rule.hf.format(j=expert)}"


def leaf_sources(cfg: ModelConfig) -> dict[str, Source]:
    """Every leaf path of our params ("/"-joined) -> its Source: the one table, read per leaf."""
    sources = {rule.ours[0]: Source(rule, 0, None) for rule in top_rules(cfg)}  # one-to-one
    for stack, moe, layers in stacks(cfg):
        for rule in layer_rules(cfg, moe):
            for k, ours in enumerate(rule.ours):
                sources[f"{stack}/{ours}"] = Source(rule, k, layers)
    return sources


def load_hf(
    path: str | os.PathLike, dtype: str | None = None, mesh: Mesh | None = None
) -> tuple[ModelConfig, dict]:
    """Reads an HF DeepSeek-V2 checkpoint (a directory or a hub id) into (ModelConfig, params).

    dtype: "float32" or "bfloat16" for the params (and cfg.param_dtype); None keeps the
    checkpoint's own (bf16 for the published weights). The compute dtype is "auto" (bf16
    on TPU/GPU, fp32 on the CPU, `config.resolve_dtype`). mesh: each leaf is born a sharded
    jax.Array placed by the rules table; this process fills only its own devices' blocks,
    each read from the memory-mapped tensors it overlaps, once per distinct block. Peak host
    memory above the finished arrays: one layer's block of one leaf (`read_leaf`).
    """
    path = local_dir(path)
    cfg, tensors = open_checkpoint(path)
    if dtype is None:
        first = tensors[min(tensors.keys())]
        dtype = "bfloat16" if first.dtype == NP_DTYPES["bfloat16"] else "float32"
    if dtype not in NP_DTYPES:
        raise UserError(f"dtype={dtype!r}: choose one of {sorted(NP_DTYPES)}")
    cfg = cfg.replace(param_dtype=dtype)
    params, _ = read_params(cfg, tensors, placement(cfg, mesh))
    return cfg, params


def open_checkpoint(path: str) -> tuple[ModelConfig, TensorDirectory]:
    """The config and the tensors of a checkpoint dir, with every key checked against the
    config from the files' headers alone (nothing is read yet)."""
    tensors = TensorDirectory(path)
    cfg = ModelConfig.from_hf(path)
    wanted = set()
    for source in leaf_sources(cfg).values():
        for layer in source.layers or [None]:
            for j in expert_slots(source.rule, cfg):
                wanted.add(source.key(layer, j))
    missing = sorted(wanted - tensors.keys())
    if missing:
        raise UserError(
            f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing), which config.json "
            f"({cfg_summary(cfg)}) needs: the checkpoint does not match its config"
        )
    unexpected = sorted(k for k in tensors.keys() - wanted if not k.endswith(IGNORED_SUFFIXES))
    if cfg.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # a tied head saved anyway: it equals the embedding
    if unexpected:
        raise UserError(
            f"{path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all), which "
            f"config.json ({cfg_summary(cfg)}) has no place for: the checkpoint does not match"
        )
    return cfg, tensors


def placement(cfg: ModelConfig, mesh: Mesh | None) -> dict:
    """A Sharding per leaf: the rules table's on `mesh`, else the default device."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
        return jax.tree.map(lambda _: device, shapes)
    return param_shardings(cfg, mesh)


def read_params(cfg: ModelConfig, tensors: TensorDirectory, shardings: dict) -> tuple[dict, int]:
    """Our params tree, each leaf assembled on its devices from `tensors`, and the bytes read."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    sources = leaf_sources(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    flat_shardings = treedef.flatten_up_to(shardings)
    names = ["/".join(str(k.key) for k in path) for path, _ in flat]
    for name, (_, shape), sharding in zip(names, flat, flat_shardings, strict=True):
        check_divides(name, shape.shape, sharding)
    leaves = [
        read_leaf(cfg, tensors, sources[name], shape.shape, sharding)
        for name, (_, shape), sharding in zip(
            tqdm(names, desc=f"loading {tensors.directory}", leave=False, disable=None),
            flat,
            flat_shardings,
            strict=True,
        )
    ]
    return jax.tree.unflatten(treedef, leaves), tensors.bytes_read


def check_divides(name: str, shape: tuple[int, ...], sharding) -> None:
    if not isinstance(sharding, NamedSharding):
        return
    for dim, (n, entry) in enumerate(zip(shape, sharding.spec, strict=False)):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        split = math.prod(sharding.mesh.shape[a] for a in axes)
        if n % split:
            raise UserError(
                f"param {name} of shape {shape}: dimension {dim} ({n}) does not split over mesh "
                f"axes {axes} of {split} devices: choose axis sizes that divide it"
            )


def read_leaf(cfg, tensors, source: Source, shape, sharding) -> jax.Array:
    """One leaf as a jax.Array on `sharding`. A stacked leaf [L, ...] whose device blocks pass
    LAYERWISE_BYTES is filled one layer at a time into its (donated) buffer, so host memory
    holds one layer's block at most: one HF tensor, or this device's experts of one layer."""
    block_bytes = math.prod(sharding.shard_shape(shape)) * NP_DTYPES[cfg.param_dtype].itemsize
    if source.layers is None or block_bytes <= LAYERWISE_BYTES:
        return place_blocks(shape, sharding, lambda b: read_block(cfg, tensors, source, shape, b))
    leaf = zeros(shape, NP_DTYPES[cfg.param_dtype], sharding)
    for layer in range(shape[0]):

        def read_layer(bounds, layer=layer):
            at = ((layer, layer + 1), *bounds[1:])
            return read_block(cfg, tensors, source, shape, at)

        slab = place_blocks((1, *shape[1:]), sharding, read_layer)
        # Waited for: dispatch runs ahead of the updates, and each pending one holds its slab
        # (a suspect for a CI run whose load peaked 70 MB past the bound, not reproduced).
        leaf = put_layer(sharding)(leaf, slab, layer).block_until_ready()
        del slab
    return leaf


# A device block past this is filled one layer at a time (two small compiles per leaf shape);
# below it, one host block is cheaper: small models load in a blink, large ones stay bounded.
LAYERWISE_BYTES = 64 << 20


def place_blocks(shape, sharding, read) -> jax.Array:
    """A jax.Array of `shape` on `sharding` from read((start, stop) per dim) -> host block:
    each distinct block of this process's devices is read once, copied to the devices that
    hold it, and freed before the next."""
    blocks: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
        blocks.setdefault(bounds, []).append(device)
    arrays = []
    for bounds, devices in blocks.items():
        block = read(bounds)
        # Blocking: an unfinished device_put keeps its host block alive until the next garbage
        # collection (jax 0.10.2, measured), which would hold every block of the leaf at once.
        arrays += [jax.device_put(block, d).block_until_ready() for d in devices]
        del block
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def zeros(shape: tuple[int, ...], dtype: np.dtype, sharding) -> jax.Array:
    """Born on its devices: no host buffer of the whole leaf."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


@functools.cache
def put_layer(sharding):
    """leaf[layer] = slab [1, ...], in place (the leaf is donated); one compile per shape."""
    return jax.jit(
        lambda leaf, slab, layer: jax.lax.dynamic_update_slice_in_dim(leaf, slab, layer, 0),
        donate_argnums=0,
        out_shardings=sharding,
    )


def read_block(cfg, tensors, source: Source, shape, bounds) -> np.ndarray:
    """Our leaf's block `bounds` ((start, stop) per dim) in cfg.param_dtype, from the HF
    tensors it overlaps (only the slices it needs)."""
    np_dtype = NP_DTYPES[cfg.param_dtype]
    rule = source.rule
    lead = 0 if source.layers is None else 2 if "{j}" in rule.hf else 1
    inner = tuple(slice(a, b) for a, b in bounds[lead:])
    block = np.empty([b - a for a, b in bounds], np_dtype)
    outer = [range(*bounds[d]) for d in range(lead)]
    for at in np.ndindex(*(len(r) for r in outer)):
        layer = source.layers[outer[0][at[0]]] if lead else None
        expert = outer[1][at[1]] if lead == 2 else None
        key = source.key(layer, expert)
        piece = split_piece(cfg, tensors, key, source, shape[lead:])[inner]
        tensors.bytes_read += piece.size * piece.itemsize
        block[at] = piece
    return block


def split_piece(cfg, tensors, key: str, source: Source, wanted: tuple[int, ...]) -> np.ndarray:
    """Piece `source.piece` of `rule.split(tensor)`: a view of the mapped tensor, so slicing
    it before the copy reads only that slice's bytes."""
    try:
        piece = source.rule.split(tensors[key])[source.piece]
    except ValueError:
        piece = None
    if piece is None or piece.shape != tuple(wanted):
        raise UserError(
            f"{tensors.file_of(key)}: tensor {key!r} has shape {tensors.shape(key)}, which does "
            f"not fit our {'/'.join(source.rule.ours)} under config.json ({cfg_summary(cfg)})"
        )
    return piece


# Files beside the weights that say how to turn text into ids and back, and how to sample:
# copied from the source checkpoint or run directory when it has them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def save_hf(
    path: str | os.PathLike,
    cfg: ModelConfig,
    params: dict,
    dtype: str | None = None,
    max_shard_bytes: int = 5 << 30,
    tokenizer: str | os.PathLike | None = None,
) -> None:
    """Writes params as an HF DeepSeek-V2 checkpoint dir (config.json + safetensors shards),
    loadable by transformers' `from_pretrained`, vLLM-style readers and `load_hf`.

    params may be sharded over any mesh, on one process or many: one HF tensor at a time is
    gathered (to every process; process 0 writes), so host memory holds about one tensor.
    tokenizer: a directory whose tokenizer files, chat template and generation_config.json
    are copied beside the weights (an HF checkpoint or a train.py run directory).
    """
    path = os.fspath(path)
    writing = jax.process_index() == 0
    dtype = dtype or cfg.param_dtype
    if dtype not in NP_DTYPES:
        raise UserError(f"dtype={dtype!r}: choose one of {sorted(NP_DTYPES)}")
    np_dtype = NP_DTYPES[dtype]
    if writing:
        os.makedirs(path, exist_ok=True)
        writer = ShardedWriter(path, max_shard_bytes)

    def emit(hf_key: str, rule: Rule, source: dict, index: tuple[int, ...]):
        slices = [gather(get_path(source, p), index) for p in rule.ours]
        if writing:
            writer.add(hf_key, rule.join(*slices).astype(np_dtype))

    for rule in top_rules(cfg):
        emit(rule.hf, rule, params, ())
    for stack, moe, layers in stacks(cfg):
        for local, layer in enumerate(
            tqdm(layers, desc=f"saving {path}", leave=False, disable=None)
        ):
            for rule in layer_rules(cfg, moe):
                for j in expert_slots(rule, cfg):
                    index = (local, j) if "{j}" in rule.hf else (local,)
                    key = f"model.layers.{layer}.{rule.hf.format(j=j)}"
                    emit(key, rule, params[stack], index)
    if not writing:
        return
    writer.close()
    hf_config = cfg.to_hf()
    hf_config["dtype"] = hf_config["torch_dtype"] = dtype  # transformers 5 and 4 read one each
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    copy_tokenizer_files(tokenizer, path)
    if not os.path.exists(os.path.join(path, "generation_config.json")):
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(
                {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, f, indent=2
            )


def copy_tokenizer_files(source: str | os.PathLike | None, target: str) -> list[str]:
    """Copies TOKENIZER_FILES that `source` has into `target`; returns their names."""
    if source is None or os.path.abspath(source) == os.path.abspath(target):
        return []
    copied = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(source, n))]
    for name in copied:
        shutil.copy(os.path.join(source, name), target)
    return copied


def gather(x, index: tuple[int, ...]) -> np.ndarray:
    """x[index] on the host, whatever x's sharding: only that slice travels. Within a process
    it is read from the device shards that hold it; across processes every process takes
    part (a collective) and gets it."""
    if isinstance(x, np.ndarray):
        return x[index]
    if not x.is_fully_addressable:
        part = take_across(x.sharding.mesh, split_dims(x.sharding, len(index)))(x, *index)
        return np.asarray(part.addressable_data(0))  # replicated: every process holds it whole
    out = np.empty(x.shape[len(index) :], x.dtype)
    filled = set()
    for shard in x.addressable_shards:
        lead, inner = shard.index[: len(index)], shard.index[len(index) :]
        spans = [s.indices(n)[:2] for s, n in zip(lead, x.shape, strict=False)]
        bounds = tuple(s.indices(n)[:2] for s, n in zip(inner, out.shape, strict=True))
        holds = all(a <= i < b for i, (a, b) in zip(index, spans, strict=True))
        if bounds in filled or not holds:
            continue
        local = [i - a for i, (a, _) in zip(index, spans, strict=True)]
        out[inner] = np.asarray(take(shard.data, *local))
        filled.add(bounds)
    return out


@jax.jit
def take(x, *index):
    """x[i, j, ...] of one device's shard, with traced indices: one compile per shard shape,
    not per layer and expert."""
    return x[index]


def split_dims(sharding, count: int) -> tuple[bool, ...]:
    """Whether `sharding` splits each of an array's first `count` dims (unknown: split)."""
    if not isinstance(sharding, NamedSharding):
        return (True,) * count
    entries = (*sharding.spec, *(None,) * count)
    return tuple(bool(entries[d]) for d in range(count))


# take_across sums a slice's bits as unsigned integers of the element's width.
UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


@functools.cache
def take_across(mesh: Mesh, split: tuple[bool, ...]):
    """x[i, j, ...] replicated over `mesh`, moving only that slice between processes.

    A dynamic slice of a split dim would make XLA gather the whole leaf onto every device
    first (an all-gather of [L, E, ...] for one expert's [D, I], read from the compiled HLO).
    Instead each device zeroes the elements of its block that are not the slice and a sum
    over the split dims (an all-reduce of one slice) assembles it. The sum runs on the bits
    as unsigned integers: one term is non-zero, so it is exact, -0.0 and NaNs included."""

    def take_one(x, *index):
        mask = True
        for d, (i, is_split) in enumerate(zip(index, split, strict=True)):
            if is_split:
                shape = [1] * x.ndim
                shape[d] = x.shape[d]
                mask = mask & (jnp.arange(x.shape[d]).reshape(shape) == i)
            else:  # a dim no device splits: slicing it moves nothing
                x = jax.lax.dynamic_slice_in_dim(x, i, 1, axis=d)
        bits = jax.lax.bitcast_convert_type(x, UNSIGNED[x.dtype.itemsize])
        bits = jnp.where(mask, bits, 0).sum(axis=tuple(range(len(index))), dtype=bits.dtype)
        return jax.lax.bitcast_convert_type(bits, x.dtype)

    return jax.jit(take_one, out_shardings=NamedSharding(mesh, P()))


def cfg_summary(cfg: ModelConfig) -> str:
    return (
        f"{cfg.num_hidden_layers} layers, D={cfg.hidden_size}, E={cfg.n_routed_experts}, "
        f"q_lora_rank={cfg.q_lora_rank}"
    )
