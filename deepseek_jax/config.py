"""ModelConfig: every shape and switch of DeepSeek-V2, as frozen, validated data.

Field names follow the published `config.json` (HF `DeepseekV2Config`) so that a reader can
put the two side by side; `from_hf` / `to_hf` convert, and the presets give the published
shapes (DESIGN.md section 1). The balance-loss weights and token-dropping knobs are the paper's
(section 2.2.3-2.2.4) and have no HF counterpart.

Sizes (total and active parameters, cache bytes per token) are in `deepseek_jax/sizes.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

TOPK_METHODS = ("greedy", "group_limited_greedy")
REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "block_outputs",
)
DTYPES = ("float32", "bfloat16", "float16")
# Attention, decode and expert-matmul implementations (deepseek_jax/kernels/select.py).
KERNELS = ("auto", "plain", "tpu", "cuda", "interpret")


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
            raise ValueError(
                f"rope_scaling.factor={self.factor}: must be >= 1 (1 means no scaling)"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError(
                "rope_scaling.original_max_position_embeddings="
                f"{self.original_max_position_embeddings}: must be positive"
            )
        if self.beta_fast <= self.beta_slow:
            raise ValueError(
                f"rope_scaling.beta_fast={self.beta_fast} must exceed beta_slow={self.beta_slow}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V2 hyper-parameters. Letters as in DESIGN.md: D, H, dn, dr, dv, r_q, r_kv, E, K."""

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
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"
    # Layers per nn.scan iteration. Unrolling a short stack saves slicing each layer's weights
    # out of the stacked array (12% of the `tiny` train step on the CPU, measured); compile
    # time grows with it, so deep models keep 1.
    scan_unroll: int = 1
    # "auto": Pallas/cuDNN kernels where the lowering platform and shapes allow, else plain.
    kernels: str = "auto"

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
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"q_lora_rank={self.q_lora_rank}: use None for no q compression")
        if self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts={self.n_shared_experts}: must be >= 0")
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"qk_rope_head_dim={self.qk_rope_head_dim}: RoPE rotates pairs, so it must be even"
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace={self.first_k_dense_replace}: must lie in "
                f"[0, num_hidden_layers={self.num_hidden_layers}]"
            )
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method={self.topk_method!r}: choose one of {TOPK_METHODS}")
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"n_routed_experts={self.n_routed_experts} is not divisible by "
                f"n_group={self.n_group}: routing groups must be equal"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        reachable = self.n_routed_experts
        if self.topk_method == "group_limited_greedy":
            reachable = self.topk_group * self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > reachable:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds the {reachable} experts "
                f"a token can reach (topk_method={self.topk_method!r}, topk_group={self.topk_group}"
                f", n_group={self.n_group}): lower it or raise topk_group"
            )
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor={self.routed_scaling_factor}: must be > 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(
                f"capacity_factor={self.capacity_factor}: must be > 0, or None for dropless"
            )
        if not 0.0 <= self.no_drop_fraction <= 1.0:
            raise ValueError(f"no_drop_fraction={self.no_drop_fraction}: must lie in [0, 1]")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {DTYPES}")
        if self.scan_unroll < 1:
            raise ValueError(f"scan_unroll={self.scan_unroll}: must be >= 1 (1: no unrolling)")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels={self.kernels!r}: choose one of {KERNELS}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}: choose one of {REMAT_POLICIES}")
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
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**fields)

    # HF config.json ----------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict, **overrides: Any) -> ModelConfig:
        """Reads a `config.json` (a path, a checkpoint directory or its parsed dict)."""
        if isinstance(source, dict):
            hf = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no config.json at {path}")
            with open(path) as f:
                hf = json.load(f)
        if hf.get("model_type", "deepseek_v2") != "deepseek_v2":
            raise ValueError(f"model_type={hf['model_type']!r}: only 'deepseek_v2' is supported")
        nope, rope = hf.get("qk_nope_head_dim", 128), hf.get("qk_rope_head_dim", 64)
        if "qk_head_dim" in hf and hf["qk_head_dim"] != nope + rope:
            raise ValueError(
                f"qk_head_dim={hf['qk_head_dim']} != qk_nope_head_dim {nope} + qk_rope_head_dim "
                f"{rope}: the query/key dims do not add up"
            )
        # Legacy checkpoints carry `rope_scaling` (+ top-level rope_theta); transformers >= 5
        # writes `rope_parameters` with rope_type and rope_theta inside.
        rope_params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ValueError(f"rope type {rope_type!r}: DeepSeek-V2 uses 'default' or 'yarn'")
        yarn = None
        if rope_type == "yarn":
            yarn = YarnConfig(
                factor=float(rope_params["factor"]),
                original_max_position_embeddings=int(
                    rope_params.get(
                        "original_max_position_embeddings", hf["max_position_embeddings"]
                    )
                ),
                beta_fast=float(rope_params.get("beta_fast") or 32),
                beta_slow=float(rope_params.get("beta_slow") or 1),
                mscale=float(rope_params.get("mscale") or 1.0),
                mscale_all_dim=float(rope_params.get("mscale_all_dim") or 0.0),
            )
        topk_method = hf.get("topk_method") or "greedy"
        n_group = hf.get("n_group") or 1
        topk_group = hf.get("topk_group") or (n_group if topk_method == "greedy" else 1)
        eos = hf.get("eos_token_id")
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope,
            v_head_dim=hf.get("v_head_dim", 128),
            intermediate_size=hf["intermediate_size"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            n_routed_experts=hf["n_routed_experts"],
            n_shared_experts=hf.get("n_shared_experts") or 0,
            num_experts_per_tok=hf["num_experts_per_tok"],
            topk_method=topk_method,
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            first_k_dense_replace=hf.get("first_k_dense_replace", 0),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=hf["max_position_embeddings"],
            rope_scaling=yarn,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            initializer_range=float(hf.get("initializer_range", 0.006)),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict:
        """The `config.json` dict that transformers' `DeepseekV2ForCausalLM` loads."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "yarn", "rope_theta": self.rope_theta}
            rope.update(dataclasses.asdict(self.rope_scaling))
        grouped = self.topk_method == "group_limited_greedy"
        return {
            "architectures": ["DeepseekV2ForCausalLM"],
            "model_type": "deepseek_v2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "topk_method": self.topk_method,
            "n_group": self.n_group if grouped else None,
            "topk_group": self.topk_group if grouped else None,
            "routed_scaling_factor": self.routed_scaling_factor,
            "norm_topk_prob": self.norm_topk_prob,
            "first_k_dense_replace": self.first_k_dense_replace,
            "moe_layer_freq": 1,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "initializer_range": self.initializer_range,
            "attention_bias": False,
            "mlp_bias": False,
            "dtype": self.param_dtype,
        }


# Presets ---------------------------------------------------------------------------------------


def v2() -> ModelConfig:
    """DeepSeek-V2 (236B total, 21B active), as published."""
    return ModelConfig()


def v2_lite() -> ModelConfig:
    """DeepSeek-V2-Lite (15.7B total, 2.4B active), as published."""
    return ModelConfig(
        hidden_size=2048,
        num_hidden_layers=27,
        num_attention_heads=16,
        q_lora_rank=None,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        n_routed_experts=64,
        num_experts_per_tok=6,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        aux_loss_alpha1=0.001,
    )


def small() -> ModelConfig:
    """A CPU-benchmark size: about 100M total parameters, group-limited routing."""
    return ModelConfig(
        vocab_size=32000,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        q_lora_rank=256,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        intermediate_size=1536,
        moe_intermediate_size=256,
        n_routed_experts=32,
        n_shared_experts=2,
        num_experts_per_tok=4,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.0,
        first_k_dense_replace=1,
        max_position_embeddings=4096,
        rope_scaling=None,
        bos_token_id=None,
        eos_token_id=None,
    )


def tiny() -> ModelConfig:
    """A test and default-job size: byte vocabulary, a few million parameters."""
    return ModelConfig(
        vocab_size=256,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=None,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        intermediate_size=768,
        moe_intermediate_size=192,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=2,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.0,
        first_k_dense_replace=1,
        max_position_embeddings=2048,
        rope_scaling=None,
        bos_token_id=None,
        eos_token_id=None,
        aux_loss_alpha1=0.001,
        aux_loss_alpha2=0.0,
        aux_loss_alpha3=0.0,
    )


PRESETS = {"tiny": tiny, "small": small, "v2_lite": v2_lite, "v2": v2}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
