"""SFT data: conversations render as transformers' apply_chat_template renders them, the loss
mask covers exactly the assistant's replies (and eos), packed conversations do not see each
other, and the SFT loss does not depend on prompt tokens."""

import json

import jax
import numpy as np
import pytest
import transformers
from hf_models import EOS, save_chat_tokenizer

import deepseek_jax as dj
from deepseek_jax.data import chat, packing
from deepseek_jax.data.tokenizers import ByteTokenizer, HFTokenizer
from deepseek_jax.train import losses
from deepseek_jax.train.step import forward

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "what is a latent cache?"},
    {"role": "assistant", "content": "compressed keys and values."},
    {"role": "user", "content": "and MLA?"},
    {"role": "assistant", "content": "the attention that uses it."},
]
CFG = dj.ModelConfig(
    vocab_size=256,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    q_lora_rank=None,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    intermediate_size=48,
    moe_intermediate_size=16,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    max_position_embeddings=256,
    rope_scaling=None,
    initializer_range=0.1,
)


def masked_runs(ids, mask):
    """The runs of consecutive ids where mask is 1."""
    runs, current = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            current.append(i)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


def test_rendering_and_mask_match_transformers(tmp_path):
    save_chat_tokenizer(str(tmp_path))
    ours = HFTokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids, mask = chat.render(ours, MESSAGES)
    hf = theirs.apply_chat_template(MESSAGES, tokenize=True)
    assert ids == list(getattr(hf, "input_ids", hf))
    # The masked runs are exactly the replies and their eos; what precedes each is
    # transformers' rendering of the conversation so far with the generation prompt.
    replies = [theirs.decode(run) for run in masked_runs(ids, mask)]
    assert replies == [" compressed keys and values." + EOS, " the attention that uses it." + EOS]
    for i in (2, 4):
        prompt = theirs.apply_chat_template(MESSAGES[:i], add_generation_prompt=True, tokenize=True)
        prompt = list(getattr(prompt, "input_ids", prompt))
        assert ids[: len(prompt)] == prompt
        assert mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1

    ids, mask = chat.render(ByteTokenizer(), MESSAGES[1:3])
    assert (
        bytes(ids) == b"User: what is a latent cache?\n\nAssistant: compressed keys and values.\x04"
    )
    assert [bytes(r) for r in masked_runs(ids, mask)] == [b" compressed keys and values.\x04"]


def test_pack_keeps_conversations_whole_and_apart():
    convs = [chat.render(ByteTokenizer(), MESSAGES[1:3]) for _ in range(3)]
    width = len(convs[0][0])
    tokens, segments, masks, real = chat.pack(convs, seq_len=2 * width + 4)  # two fit a row
    assert tokens.shape == (2, 2 * width + 5)
    assert segments[0].tolist() == [0] * width + [1] * width + [2] * 5  # padding: its own
    assert real[0].tolist() == [1] * 2 * width + [0] * 5
    assert masks[0, -5:].sum() == 0 and (tokens[1, :width] == convs[2][0]).all()

    ex = packing.example(tokens[0], segments[0], masks[0])
    params = dj.init_params(CFG, jax.random.key(0))
    batch = jax.tree.map(lambda x: x[None], ex)
    packed = forward(CFG, params, batch).logits[0]
    alone = dj.DeepSeekV2(CFG).apply({"params": params}, tokens[:1, :width]).logits[0]
    np.testing.assert_allclose(packed[width : 2 * width], alone, atol=1e-5)


def test_sft_loss_ignores_prompt_tokens():
    ids, mask = chat.render(ByteTokenizer(), MESSAGES[1:3])
    tokens, segments, masks, _ = chat.pack([(ids, mask)], seq_len=len(ids) - 1)
    ex = packing.example(tokens[0], segments[0], masks[0])
    # Exactly the reply's tokens (and eos) are targets.
    assert ex["weights"].sum() == sum(mask)
    assert bytes(ex["targets"][ex["weights"] > 0].tolist()) == b" compressed keys and values.\x04"
    params = dj.init_params(CFG, jax.random.key(0))

    def loss(targets):
        batch = jax.tree.map(lambda x: x[None], {**ex, "targets": targets})
        logits = forward(CFG, params, batch).logits
        return float(losses.nll_sum(logits, batch["targets"], batch["weights"]))

    prompt = ex["weights"] == 0
    scrambled = np.where(prompt, (ex["targets"] + 7) % 256, ex["targets"])
    assert loss(scrambled) == pytest.approx(loss(ex["targets"]), abs=1e-6)
    reply = np.where(~prompt, (ex["targets"] + 7) % 256, ex["targets"])
    assert loss(reply) != pytest.approx(loss(ex["targets"]), abs=1e-3)


def test_chat_file_errors_name_the_fix(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(KeyError, match="no list 'messages'"):
        list(chat.read_conversations(str(path)))
