"""ModelConfig: every shape and switch of DeepSeek-V2, as frozen, validated data.

Field names follow the published `config.json` (HF `DeepseekV2Config`) so that a reader can
put the two side by side; `from_hf` / `to_hf` convert, and the presets give the published
shapes (docs/design.md section 1). The balance-loss weights and token-dropping knobs are the paper's
(section 2.2.3-2.2.4) and have no HF counterpart.

Sizes (total and active parameters, cache bytes per token) are in `deepseek_jax/sizes.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from deepseek_jax.errors import UserError

TOPK_METHODS = ("greedy", "group_limited_greedy")
REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "block_outputs",
)
DTYPES = ("float32", "bfloat16", "float16")
# The compute dtype may also be "auto": bfloat16 where the computation is for a TPU or GPU,
# float32 on the CPU (`resolve_dtype`). Router, norms, softmax and losses are float32 always.
COMPUTE_DTYPES = ("auto", *DTYPES)
# Platform names (a device's, jax.default_backend()'s, jax.export's) whose matrix units run
# bf16 at full rate; this CPU runs bf16 slower than fp32 (docs/design.md 7).
ACCELERATORS = ("tpu", "gpu", "cuda", "rocm")
# Attention, decode and expert-matmul implementations (deepseek_jax/kernels/select.py).
KERNELS = ("auto", "plain", "tpu", "cuda", "interpret")
# Expert-parallel dispatch collectives (deepseek_jax/parallel/ragged.py).
DISPATCHES = ("auto", "dense", "ragged", "emulated")


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    """YaRN context extension (arXiv 2309.00071) as DeepSeek-V2 configures it."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self):
        if self.factor < 1.0:
            raise UserError(f"rope_scaling.factor={self.factor}: must be >= 1 (1 means no scaling)")
        if self.original_max_position_embeddings <= 0:
            raise UserError(
                "rope_scaling.original_max_position_embeddings="
                f"{self.original_max_position_embeddings}: must be positive"
            )
        if self.beta_fast <= self.beta_slow:
            raise UserError(
                f"rope_scaling.beta_fast={self.beta_fast} must exceed beta_slow={self.beta_slow}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V2 hyper-parameters. Letters as in docs/design.md: D, H, dn, dr, dv, r_q, r_kv, E, K."""

    vocab_size: int = 102400
    hidden_size: int = 5120  # D
    num_hidden_layers: int = 60
    num_attention_heads: int = 128  # H
    # MLA (paper 2.1)
    q_lora_rank: int | None = 1536  # r_q; None: q = W_Q x without compression (V2-Lite)
    kv_lora_rank: int = 512  # r_kv
    qk_nope_head_dim: int = 128  # dn
    qk_rope_head_dim: int = 64  # dr
    v_head_dim: int = 128  # dv
    # FFN / DeepSeekMoE (paper 2.2)
    intermediate_size: int = 12288  # dense layers
    moe_intermediate_size: int = 1536  # one expert
    n_routed_experts: int = 160  # E
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6  # K
    topk_method: str = "group_limited_greedy"
    n_group: int = 8  # G: routing groups = devices of the expert axis
    topk_group: int = 3  # M: groups (devices) a token may reach
    routed_scaling_factor: float = 16.0
    norm_topk_prob: bool = False
    first_k_dense_replace: int = 1
    # Norms and positions
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 163840
    rope_scaling: YarnConfig | None = YarnConfig(mscale=0.707, mscale_all_dim=0.707)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    # Training-only (paper 2.2.3-2.2.4): balance-loss weights and token dropping.
    aux_loss_alpha1: float = 0.003  # expert-level balance
    aux_loss_alpha2: float = 0.05  # device-level balance
    aux_loss_alpha3: float = 0.02  # communication balance
    capacity_factor: float | None = None  # None: dropless
    no_drop_fraction: float = 0.1  # share of sequences whose tokens are never dropped
    # Numerics and memory
    initializer_range: float = 0.006
    dtype: str = "auto"  # compute dtype; "auto": bf16 on TPU/GPU, fp32 on CPU (resolve_dtype)
    param_dtype: str = "float32"
    remat_policy: str = "none"
    # Layers per nn.scan iteration. Unrolling a short stack saves slicing each layer's weights
    # out of the stacked array (12% of the `tiny` train step on the CPU, measured); compile
    # time grows with it, so deep models keep 1.
    scan_unroll: int = 1
    # Keys (and queries) per attention block once a sequence outgrows one block: no
    # [B, H, T, S] array is then written (model/attention.py). None: the platform's default.
    attention_block_size: int | None = None
    # "auto": Pallas/cuDNN kernels where the lowering platform and shapes allow, else plain.
    kernels: str = "auto"
    # Expert-parallel dispatch. "auto": ragged_all_to_all where the lowering platform has it
    # (TPU, GPU), the dense all_to_all on the CPU; "emulated": the ragged dispatch with a dense
    # stand-in for the collective (tests, any platform).
    dispatch: str = "auto"

    def __post_init__(self):
        positive = (
            "vocab_size hidden_size num_hidden_layers num_attention_heads kv_lora_rank "
            "qk_nope_head_dim qk_rope_head_dim v_head_dim intermediate_size "
            "moe_intermediate_size n_routed_experts num_experts_per_tok n_group topk_group "
            "max_position_embeddings"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{name}={value!r}: must be a positive integer")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise UserError(f"q_lora_rank={self.q_lora_rank}: use None for no q compression")
        if self.n_shared_experts < 0:
            raise UserError(f"n_shared_experts={self.n_shared_experts}: must be >= 0")
        if self.qk_rope_head_dim % 2:
            raise UserError(
                f"qk_rope_head_dim={self.qk_rope_head_dim}: RoPE rotates pairs, so it must be even"
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise UserError(
                f"first_k_dense_replace={self.first_k_dense_replace}: must lie in "
                f"[0, num_hidden_layers={self.num_hidden_layers}]"
            )
        if self.topk_method not in TOPK_METHODS:
            raise UserError(f"topk_method={self.topk_method!r}: choose one of {TOPK_METHODS}")
        if self.n_routed_experts % self.n_group:
            raise UserError(
                f"n_routed_experts={self.n_routed_experts} is not divisible by "
                f"n_group={self.n_group}: routing groups must be equal"
            )
        if self.topk_group > self.n_group:
            raise UserError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        reachable = self.n_routed_experts
        if self.topk_method == "group_limited_greedy":
            reachable = self.topk_group * self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > reachable:
            raise UserError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds the {reachable} experts "
                f"a token can reach (topk_method={self.topk_method!r}, topk_group={self.topk_group}"
                f", n_group={self.n_group}): lower it or raise topk_group"
            )
        if self.routed_scaling_factor <= 0:
            raise UserError(f"routed_scaling_factor={self.routed_scaling_factor}: must be > 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise UserError(
                f"capacity_factor={self.capacity_factor}: must be > 0, or None for dropless"
            )
        if not 0.0 <= self.no_drop_fraction <= 1.0:
            raise UserError(f"no_drop_fraction={self.no_drop_fraction}: must lie in [0, 1]")
        if self.dtype not in COMPUTE_DTYPES:
            raise UserError(f"dtype={self.dtype!r}: choose one of {COMPUTE_DTYPES}")
        if self.param_dtype not in DTYPES:
            raise UserError(f"param_dtype={self.param_dtype!r}: choose one of {DTYPES}")
        if self.scan_unroll < 1:
            raise UserError(f"scan_unroll={self.scan_unroll}: must be >= 1 (1: no unrolling)")
        if self.attention_block_size is not None and self.attention_block_size <= 0:
            raise UserError(
                f"attention_block_size={self.attention_block_size}: must be a positive "
                "integer, or None for the platform's default"
            )
        if self.kernels not in KERNELS:
            raise UserError(f"kernels={self.kernels!r}: choose one of {KERNELS}")
        if self.dispatch not in DISPATCHES:
            raise UserError(f"dispatch={self.dispatch!r}: choose one of {DISPATCHES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise UserError(f"remat_policy={self.remat_policy!r}: choose one of {REMAT_POLICIES}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", YarnConfig(**self.rope_scaling))

    # Derived sizes ---------------------------------------------------------------------------

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def groups_per_token(self) -> int:
        """M in the paper: how many routing groups (devices) one token may reach."""
        if self.topk_method == "group_limited_greedy":
            return self.topk_group
        return min(self.num_experts_per_tok, self.n_group)

    @property
    def latent_cache_dim(self) -> int:
        """Numbers cached per token per layer by the absorbed decode: [c_kv | k_pe]."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def expanded_cache_dim(self) -> int:
        """Numbers per token per layer in a conventional per-head K/V cache."""
        return self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field as JSON-ready data (our own format; `to_hf` is the HF one)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> ModelConfig:
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**fields)

    # HF config.json ----------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict, **overrides: Any) -> ModelConfig:
        """Reads a `config.json` (a path, a checkpoint directory or its parsed dict) by
        `HF_FIELDS`. A key we do not implement with a value other than the one we implement
        (`UNSUPPORTED`), or a key in no table, is refused by name: never silently ignored."""
        hf = dict(source) if isinstance(source, dict) else read_json_config(source)
        check_hf_keys(hf)
        fields = {}
        for row in HF_FIELDS:
            if row.hf is not None:
                fields[row.name] = hf.get(row.hf, row.hf_default)
        if fields["num_experts_per_tok"] is None:
            raise UserError("config.json: num_experts_per_tok is missing: DeepSeek-V2 routes to K")
        # HF writes None for "not used"; our fields carry the value that means the same.
        fields["n_shared_experts"] = fields["n_shared_experts"] or 0
        fields["n_group"] = fields["n_group"] or 1
        if fields["topk_group"] is None:
            greedy = fields["topk_method"] == "greedy"
            fields["topk_group"] = fields["n_group"] if greedy else 1
        eos = fields["eos_token_id"]
        fields["eos_token_id"] = eos[0] if isinstance(eos, list) else eos
        for name in ("routed_scaling_factor", "rms_norm_eps", "initializer_range"):
            fields[name] = float(fields[name])
        fields["rope_theta"], fields["rope_scaling"] = rope_from_hf(hf)
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict:
        """The `config.json` dict of the published checkpoints' form (legacy `rope_scaling` +
        top-level `rope_theta`, which transformers >= 5 and vLLM-style readers both take)."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV2ForCausalLM"],
            "model_type": "deepseek_v2",
        }
        for row in HF_FIELDS:
            if row.hf is not None:
                out[row.hf] = getattr(self, row.name)
        grouped = self.topk_method == "group_limited_greedy"
        out["n_group"] = self.n_group if grouped else None
        out["topk_group"] = self.topk_group if grouped else None
        out["rope_theta"] = self.rope_theta
        out["rope_scaling"] = None
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        out.update({k: v for k, v in UNSUPPORTED.items() if k != "num_key_value_heads"})
        out["num_key_value_heads"] = self.num_attention_heads
        out["dtype"] = self.param_dtype
        return out

    # Architecture against execution ------------------------------------------------------------

    def architecture(self) -> dict[str, Any]:
        """The fields that say what the weights mean (`KINDS` "architecture")."""
        return {f: getattr(self, f) for f, kind in KINDS.items() if kind == "architecture"}

    def architecture_difference(self, other: ModelConfig) -> str | None:
        """The first architecture field that differs from `other`'s, as `name: ours vs
        theirs`, or None when the weights of one fit the other (execution may differ)."""
        for name, value in self.architecture().items():
            if getattr(other, name) != value:
                return f"{name}: {value!r} vs {getattr(other, name)!r}"
        return None


def resolve_dtype(cfg: ModelConfig, platform=None) -> ModelConfig:
    """cfg with a concrete compute dtype: "auto" becomes bfloat16 when the computation is for
    a TPU or GPU and float32 on the CPU; an explicit dtype is kept. The params stay in
    cfg.param_dtype (fp32 masters by default), cast to the compute dtype where used.

    platform: a platform name ("cpu", "tpu", "gpu", or jax.export's "cuda"/"rocm": exporting
    for TPU from a CPU host passes "tpu"), a Mesh (its devices' platform), or None
    (jax.default_backend()). Every consumer (model, cache, steps, planner) calls it."""
    if cfg.dtype != "auto":
        return cfg
    if platform is None:
        import jax  # noqa: PLC0415  (config.py is data; only this asks the backend)

        platform = jax.default_backend()
    elif not isinstance(platform, str):
        platform = platform.devices.flat[0].platform
    return cfg.replace(dtype="bfloat16" if platform in ACCELERATORS else "float32")


def matmul_precision(cfg: ModelConfig) -> str:
    """The model's matmul precision: float32 compute means float32 products ("highest"),
    where a GPU's default would round their inputs to TF32 (an H200 put the logits 5.7e-3
    from transformers' fp32 ones so, 2.8e-6 at "highest"); 16-bit compute keeps the
    default. The CPU computes float32 products in full either way."""
    return "highest" if cfg.dtype == "float32" else "default"


def read_json_config(source: str | os.PathLike) -> dict:
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise UserError(f"no config.json at {path}: give an HF checkpoint dir or its config.json")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not JSON ({e}): restore the checkpoint's config") from None


def check_hf_keys(hf: dict) -> None:
    if hf.get("model_type", "deepseek_v2") != "deepseek_v2":
        raise UserError(f"model_type={hf['model_type']!r}: only 'deepseek_v2' is supported")
    for key, supported in UNSUPPORTED.items():
        value = hf.get(key, supported)
        if key == "num_key_value_heads":  # MLA: one latent, every head reads it
            supported = hf.get("num_attention_heads", value)
        if key == "head_dim":  # transformers sets it to qk_rope_head_dim
            supported = hf.get("qk_rope_head_dim", 64) if value is not None else None
        if value is not None and value != supported:
            raise UserError(
                f"config.json: {key}={value!r} is not supported (only {supported!r}): "
                "deepseek-jax implements DeepSeek-V2 exactly as published"
            )
    nope, rope = hf.get("qk_nope_head_dim", 128), hf.get("qk_rope_head_dim", 64)
    if hf.get("qk_head_dim", nope + rope) != nope + rope:
        raise UserError(
            f"config.json: qk_head_dim={hf['qk_head_dim']} != qk_nope_head_dim {nope} + "
            f"qk_rope_head_dim {rope}: the query/key dims do not add up"
        )
    known = {row.hf for row in HF_FIELDS} | set(UNSUPPORTED) | HF_IGNORED | HF_ROPE
    unknown = sorted(set(hf) - known)
    if unknown:
        raise UserError(
            f"config.json: field {unknown[0]!r} is unknown to deepseek-jax (unknown: {unknown}):"
            " it would be ignored, so the model could differ from the checkpoint's"
        )


def rope_from_hf(hf: dict) -> tuple[float, YarnConfig | None]:
    """(rope_theta, YaRN or None). Published checkpoints carry `rope_scaling` (with "type") and
    a top-level rope_theta; transformers >= 5 writes `rope_parameters` with both inside."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise UserError(
            f"config.json: rope type {rope_type!r}: DeepSeek-V2 uses 'default' or 'yarn'"
        )
    if rope_type == "default":
        return theta, None
    return theta, YarnConfig(
        factor=float(params["factor"]),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", hf["max_position_embeddings"])
        ),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 1.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
    )


@dataclasses.dataclass(frozen=True)
class Row:
    """One ModelConfig field: its kind, and its HF `config.json` key and the value transformers
    assumes when the key is absent (None hf: no HF counterpart)."""

    name: str
    kind: str  # "architecture": what the weights mean; "execution": how they are run/trained
    hf: str | None = None
    hf_default: Any = None


A, X = "architecture", "execution"
# Architecture fields that config.json names as we do, with the value transformers assumes when
# the key is absent.
HF_SAME_NAME = {
    "vocab_size": 102400, "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "intermediate_size": 11008, "moe_intermediate_size": 1407, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_experts_per_tok": None, "topk_method": "greedy",
    "n_group": None, "topk_group": None, "routed_scaling_factor": 1.0,
    "norm_topk_prob": False, "first_k_dense_replace": 0, "rms_norm_eps": 1e-6,
}  # fmt: skip
# The one table: every ModelConfig field, in order. from_hf and to_hf read it; checkpoints
# compare the "architecture" rows only (a run may change remat, dtypes, capacity ...).
HF_FIELDS = (
    *(Row(name, A, name, default) for name, default in HF_SAME_NAME.items()),
    Row("rope_theta", A),  # with rope_scaling: two HF forms, see rope_from_hf
    Row("max_position_embeddings", A, "max_position_embeddings", 2048),
    Row("rope_scaling", A),
    Row("tie_word_embeddings", A, "tie_word_embeddings", False),
    Row("bos_token_id", X, "bos_token_id", 1),
    Row("eos_token_id", X, "eos_token_id", 2),
    Row("aux_loss_alpha1", X, "aux_loss_alpha", 0.001),
    # Execution fields without an HF counterpart.
    *(
        Row(n, X)
        for n in ("aux_loss_alpha2", "aux_loss_alpha3", "capacity_factor", "no_drop_fraction")
    ),
    Row("initializer_range", X, "initializer_range", 0.02),
    *(
        Row(n, X)
        for n in (
            "dtype",
            "param_dtype",
            "remat_policy",
            "scan_unroll",
            "attention_block_size",
            "kernels",
            "dispatch",
        )
    ),
)
KINDS = {row.name: row.kind for row in HF_FIELDS}
# HF fields of variants we do not implement, with the one value we do: any other is refused.
UNSUPPORTED = {
    "moe_layer_freq": 1,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "pretraining_tp": 1,
    "scoring_func": "softmax",
    "seq_aux": True,
    "ep_size": 1,
    "num_key_value_heads": None,  # must equal num_attention_heads (check_hf_keys)
    "head_dim": None,  # must equal qk_rope_head_dim where written (check_hf_keys)
}
HF_ROPE = {"rope_theta", "rope_scaling", "rope_parameters", "qk_head_dim"}
# PretrainedConfig's generic keys and loading hints: none changes the model's function.
HF_IGNORED = {
    "architectures", "model_type", "auto_map", "transformers_version", "_name_or_path",
    "dtype", "torch_dtype", "use_cache", "pad_token_id", "output_hidden_states",
    "output_attentions", "output_router_logits", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "_attn_implementation",
}  # fmt: skip


# Presets ---------------------------------------------------------------------------------------


# The published V2 is ModelConfig's defaults; the other presets, one column each, state only
# what differs from it (`...`: V2's value). v2_lite: DeepSeek-V2-Lite (15.7B total, 2.4B
# active) as published; small: a CPU-benchmark size, about 100M total parameters with
# group-limited routing; tiny: the test and default-job size, byte vocabulary, a few million
# parameters.
PRESET_COLUMNS = ("v2_lite", "small", "tiny")
# fmt: off
PRESET_TABLE = {
    "vocab_size":              (...,      32000, 256),
    "hidden_size":             (2048,     512,   256),
    "num_hidden_layers":       (27,       8,     4),
    "num_attention_heads":     (16,       8,     4),
    "q_lora_rank":             (None,     256,   None),
    "kv_lora_rank":            (...,      128,   64),
    "qk_nope_head_dim":        (...,      64,    32),
    "qk_rope_head_dim":        (...,      32,    16),
    "v_head_dim":              (...,      64,    32),
    "intermediate_size":       (10944,    1536,  768),
    "moe_intermediate_size":   (1408,     256,   192),
    "n_routed_experts":        (64,       32,    16),
    "n_shared_experts":        (...,      ...,   1),
    "num_experts_per_tok":     (...,      4,     2),
    "topk_method":             ("greedy", ...,   ...),
    "n_group":                 (1,        4,     4),
    "topk_group":              (1,        2,     2),
    "routed_scaling_factor":   (1.0,      2.0,   1.0),
    "max_position_embeddings": (...,      4096,  2048),
    "rope_scaling":            (...,      None,  None),
    "bos_token_id":            (...,      None,  None),
    "eos_token_id":            (...,      None,  None),
    "aux_loss_alpha1":         (0.001,    ...,   0.001),
    "aux_loss_alpha2":         (...,      ...,   0.0),
    "aux_loss_alpha3":         (...,      ...,   0.0),
}
# fmt: on


def preset_column(name: str) -> ModelConfig:
    """The preset of PRESET_TABLE's column `name`."""
    i = PRESET_COLUMNS.index(name)
    return ModelConfig(
        **{field: row[i] for field, row in PRESET_TABLE.items() if row[i] is not ...}
    )


def v2() -> ModelConfig:
    """DeepSeek-V2 (236B total, 21B active), as published."""
    return ModelConfig()


def v2_lite() -> ModelConfig:
    """DeepSeek-V2-Lite (15.7B total, 2.4B active), as published."""
    return preset_column("v2_lite")


def small() -> ModelConfig:
    """A CPU-benchmark size: about 100M total parameters, group-limited routing."""
    return preset_column("small")


def tiny() -> ModelConfig:
    """A test and default-job size: byte vocabulary, a few million parameters."""
    return preset_column("tiny")


PRESETS = {"tiny": tiny, "small": small, "v2_lite": v2_lite, "v2": v2}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
