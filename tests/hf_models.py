"""Small random transformers `DeepseekV2ForCausalLM` models: the numerical oracle (docs/design.md 2).

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


# 16 experts in 4 groups, each token's 3 experts from its top 2 groups, gates scaled by 2.5:
# the group limit changes which experts win (topk_group 2 x 4 experts > K = 3).
GROUP_LIMITED = dict(
    topk_method="group_limited_greedy",
    n_routed_experts=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=3,
    routed_scaling_factor=2.5,
)


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


# The published DeepSeek-V2-Chat template (docs/design.md 8) and special tokens.
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}"
)


def save_chat_tokenizer(directory, vocab_size: int = 300) -> int:
    """A small byte-level BPE tokenizer.json + tokenizer_config.json with the published chat
    template and bos/eos, as a Chat checkpoint ships them. Returns its vocabulary size."""
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["User: what is a latent cache?\n\nAssistant: compressed keys and values."] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "chat_template": CHAT_TEMPLATE}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return tok.get_vocab_size()
