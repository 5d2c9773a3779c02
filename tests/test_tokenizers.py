"""Tokenizers: bytes round-trip; an HF tokenizer.json + tokenizer_config.json directory gives
the ids, chat rendering and decoding that transformers' AutoTokenizer gives (docs/design.md 8)."""

import json

import pytest
import transformers
from hf_models import BOS, CHAT_TEMPLATE, EOS
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from deepseek_jax.data.tokenizers import ByteTokenizer, TextStream, load_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "User: what is a latent cache?\n\nAssistant: the compressed keys and values.",
    "Ünïcödé text, 中文字符, and emoji 🙂 are bytes too.",
] * 20
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there, 中文?"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is MLA?"},
]


def added_token(content):
    """A special token as the published tokenizer_config.json writes it."""
    flags = dict(lstrip=False, normalized=True, rstrip=False, single_word=False)
    return {"__type": "AddedToken", "content": content, **flags}


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    # The published tokenizer.json adds bos to a plain prompt through its post-processor.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": added_token(BOS),
        "eos_token": added_token(EOS),
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_bytes_round_trip():
    tok = ByteTokenizer()
    text = "héllo, 世界 🙂"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < tok.vocab_size
    # The built-in template is DeepSeek-V2-Chat's, with no bos and byte 4 as eos.
    assert tok.chat_template == CHAT_TEMPLATE
    ids = tok.encode_chat(MESSAGES[1:3], add_generation_prompt=False)
    assert tok.decode(ids) == "User: Hi there, 中文?\n\nAssistant: Hello.\x04"
    assert ids[-1] == tok.eos_id == 4


def test_directory_without_tokenizer_json_falls_back_to_bytes(tmp_path):
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)


def test_hf_tokenizer_matches_transformers(checkpoint_dir):
    ours = load_tokenizer(checkpoint_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(checkpoint_dir)
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    for text in CORPUS[:3] + ["unseen wörds 🙂"]:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"]
        assert ids[0] == ours.bos_id
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)

    for add in (True, False):
        text = ours.apply_chat_template(MESSAGES, add_generation_prompt=add)
        assert text == theirs.apply_chat_template(
            MESSAGES, add_generation_prompt=add, tokenize=False
        )
        ids = ours.encode_chat(MESSAGES, add_generation_prompt=add)
        hf_ids = theirs.apply_chat_template(MESSAGES, add_generation_prompt=add, tokenize=True)
        assert ids == list(getattr(hf_ids, "input_ids", hf_ids))
    assert text.startswith(BOS + "Be brief.\n\nUser: Hi there")
    assert "Assistant: Hello." + EOS in text


def test_stream_holds_back_split_characters(checkpoint_dir):
    for tok in (ByteTokenizer(), load_tokenizer(checkpoint_dir)):
        text = "中文 and 🙂 ok"
        ids = tok.encode(text)
        stream = TextStream(tok)
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) == tok.decode(ids)
        assert all("\ufffd" not in p for p in pieces)
