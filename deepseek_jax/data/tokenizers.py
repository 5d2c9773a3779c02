"""Tokenizers: a byte-level default that needs no files, and a checkpoint's own HF tokenizer.

Legend: ids are Python ints; a batch of them is a list of lists. A message is
{"role": "system" | "user" | "assistant", "content": str}.

    tok = load_tokenizer("path/to/checkpoint")    # tokenizer.json there, else bytes
    ids = tok.encode("Hello")                     # special tokens as the checkpoint adds them
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])   # its chat template + prompt

The HF tokenizer is the `tokenizers` library on `tokenizer.json`; its special tokens and chat
template come from `tokenizer_config.json` (or `chat_template.jinja`, where transformers >= 5
writes it), rendered with jinja2 the way transformers renders it.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from datetime import datetime

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"


# The published DeepSeek-V2-Chat template (tokenizer_config.json), verbatim.
DEEPSEEK_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}"
)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255. No bos; eos is byte 4 (ASCII "end of transmission"), which
    text never holds, so it can end a chat turn. The chat template is DeepSeek-V2-Chat's."""

    vocab_size = 256
    bos_id: int | None = None
    eos_token = "\x04"
    eos_id = 4
    chat_template = DEEPSEEK_CHAT_TEMPLATE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt,
            bos_token="",
            eos_token=self.eos_token,
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


def special_token(entry) -> str | None:
    """tokenizer_config.json writes a special token as its text or as {"content": text, ...}."""
    if isinstance(entry, dict):
        return entry.get("content")
    return entry


@functools.cache
def compile_template(template: str):
    """The chat template compiled as transformers compiles it: a sandboxed jinja2 environment
    with trim_blocks/lstrip_blocks, `tojson`, `raise_exception` and `strftime_now`. Cached:
    SFT renders every conversation several times (`deepseek_jax.data.chat.render`)."""
    from jinja2.ext import loopcontrols  # noqa: PLC0415  (jinja2 only for chat)
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    def raise_exception(message):
        raise ValueError(f"the chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool, **tokens):
    """The chat template rendered as transformers renders it."""
    return compile_template(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **tokens
    )


class HFTokenizer:
    """A checkpoint's `tokenizer.json` (via the `tokenizers` library) and its chat template."""

    def __init__(self, directory: str | os.PathLike):
        from tokenizers import Tokenizer  # noqa: PLC0415  (optional dependency)

        directory = os.fspath(directory)
        self.tokenizer = Tokenizer.from_file(os.path.join(directory, TOKENIZER_FILE))
        config = {}
        if os.path.exists(os.path.join(directory, CONFIG_FILE)):
            with open(os.path.join(directory, CONFIG_FILE)) as f:
                config = json.load(f)
        self.bos_token = special_token(config.get("bos_token"))
        self.eos_token = special_token(config.get("eos_token"))
        self.bos_id = self.token_id(self.bos_token)
        self.eos_id = self.token_id(self.eos_token)
        self.chat_template = config.get("chat_template")
        if os.path.exists(os.path.join(directory, TEMPLATE_FILE)):
            with open(os.path.join(directory, TEMPLATE_FILE)) as f:
                self.chat_template = f.read()
        if isinstance(self.chat_template, list):  # named templates: use "default"
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`, with the special tokens tokenizer.json's post-processor adds (bos for
        the published checkpoints). transformers >= 5 follows the post-processor too and
        ignores tokenizer_config.json's add_bos_token."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError(
                f"this tokenizer has no chat_template (looked in {CONFIG_FILE} and "
                f"{TEMPLATE_FILE}): prompt without --chat"
            )
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The rendered conversation's ids. The template writes bos itself, so nothing is added
        (transformers' apply_chat_template does the same)."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(directory: str | os.PathLike | None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of a checkpoint directory: its tokenizer.json if it has one, else bytes."""
    if directory is not None and os.path.exists(os.path.join(directory, TOKENIZER_FILE)):
        return HFTokenizer(directory)
    return ByteTokenizer()


class TextStream:
    """Ids arriving one at a time -> the new text each adds, holding back a piece until it
    decodes whole (a byte-level token can end inside a UTF-8 character)."""

    def __init__(self, tokenizer: ByteTokenizer | HFTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown :], len(text)
        return new
