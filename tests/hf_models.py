"""Small random transformers `DeepseekV2ForCausalLM` models: the numerical oracle (DESIGN.md 2).

Weights are drawn with initializer_range 0.1 and the RMSNorm weights are randomised, so a
swapped matrix, a wrong transpose or a skipped norm changes the logits visibly.
"""

import torch
import transformers

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.8,
    "mscale_all_dim": 0.6,
}


def hf_config(**overrides) -> transformers.DeepseekV2Config:
    fields = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        topk_method="greedy",
        routed_scaling_factor=1.0,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    fields.update(overrides)
    return transformers.DeepseekV2Config(**fields)


def build_hf(directory, seed: int = 0, **overrides) -> transformers.DeepseekV2ForCausalLM:
    """A random fp32 eager-attention model, saved to `directory` (safetensors + config.json)."""
    torch.manual_seed(seed)
    model = transformers.DeepseekV2ForCausalLM._from_config(
        hf_config(**overrides), attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(directory)
    return model


def hf_logits(model, tokens) -> "torch.Tensor":
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()
