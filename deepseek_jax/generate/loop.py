"""Generation: a jitted prefill, then a decode loop that stays on the device.

Legend: B batch, P padded prompt length, N new tokens, S = P + N cache slots, V vocabulary.

    new_BN = generate(cfg, params, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.7)

Prompts of different lengths share a batch: they are right-padded to P and the prefill is the
model's full (expanded-MLA) forward, whose causal mask keeps padding out of every real
position. Its latents fill the cache's first P slots; row b's first new token comes from its
logits at position len_b - 1. Each decode step feeds one token per row at position
len_b + i - 1 and writes its latent at that slot (slot index == position), so the padding
slots of a short row are overwritten before they are ever attended to. Decode runs MLA's
absorbed form over the latent cache inside one `lax.while_loop`: no Python per token.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.generate.cache import write_prefix
from deepseek_jax.generate.sampling import check_settings, sample
from deepseek_jax.model.layers import RMSNorm
from deepseek_jax.model.rope import rope_cos_sin
from deepseek_jax.model.transformer import Block, DeepSeekV2, attention_mask, init_cache

# stream(step, tokens_B): called on the host as each step's tokens leave the device.
StreamFn = Callable[[int, np.ndarray], None]


def pad_prompts(cfg: ModelConfig, prompts, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged prompts -> right-padded tokens [B, P] int32 and lengths [B], with the checks that
    would otherwise fail deep inside the compiled loop (or, for bad ids, not fail at all)."""
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 1:
        prompts = [prompts]
    rows = [np.asarray(p).reshape(-1) for p in prompts]
    if not rows:
        raise ValueError("prompts is empty: give at least one prompt (a sequence of token ids)")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be a positive integer")
    for b, row in enumerate(rows):
        if row.size == 0:
            raise ValueError(f"prompt {b} is empty: every prompt needs at least one token")
        if not np.issubdtype(row.dtype, np.integer):
            raise ValueError(f"prompt {b} has dtype {row.dtype}: token ids must be integers")
        bad = row[(row < 0) | (row >= cfg.vocab_size)]
        if bad.size:
            raise ValueError(
                f"prompt {b} holds token id {int(bad[0])}, outside the model's vocabulary "
                f"[0, {cfg.vocab_size}): use the tokenizer that belongs to this checkpoint"
            )
        if row.size + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt {b} has {row.size} tokens; with max_new_tokens={max_new_tokens} that "
                f"passes the context of {cfg.max_position_embeddings} positions "
                "(max_position_embeddings): shorten the prompt or lower max_new_tokens"
            )
    lengths = np.array([row.size for row in rows], np.int32)
    tokens = np.zeros((len(rows), lengths.max()), np.int32)
    for b, row in enumerate(rows):
        tokens[b, : row.size] = row
    return tokens, lengths


def prefill(
    cfg: ModelConfig, params: dict, tokens_BP, lengths_B, cache_len: int
) -> tuple[jnp.ndarray, dict]:
    """Full forward over right-padded prompts. Returns the logits [B, V] at each row's last
    real position and a cache of `cache_len` slots whose first P hold the prompts' latents."""
    b, p = tokens_BP.shape
    out = DeepSeekV2(cfg).apply({"params": params}, tokens_BP)
    logits_BV = out.logits[jnp.arange(b), lengths_B - 1]
    cache = write_prefix(init_cache(cfg, b, cache_len), out.cache)
    return logits_BV, cache


STACKS = (("dense", False), ("moe", True))


def unstack_layers(params: dict) -> dict:
    """{"dense": [per-layer params, ...], "moe": [...]}: each layer's weights as their own arrays.

    Done once before the decode loop. Inside it, the model's `nn.scan` would slice every
    layer's weights out of the stacked arrays at every step, and XLA:CPU copies such slices
    before a matmul: ~30% of a `small` decode step (measured), for nothing.
    """
    layers = {}
    for key, _ in STACKS:
        stacked = params.get(f"{key}_layers")
        if stacked is not None:
            n = jax.tree.leaves(stacked)[0].shape[0]
            layers[key] = [jax.tree.map(lambda w, l=l: w[l], stacked) for l in range(n)]
    return layers


def decode_step(
    cfg: ModelConfig, params: dict, layers: dict, tokens_B, positions_B, cache: dict
) -> tuple[jnp.ndarray, dict]:
    """One token per row at `positions_B`: logits [B, V] and the updated cache.

    The model's own blocks, applied one at a time to `layers = unstack_layers(params)`, each
    with its cache [B, S, C + R]: MLA's absorbed form over the latents. Embedding, final norm
    and head as in `DeepSeekV2`; tests hold every position's logits to the full forward's.
    """
    positions_BT = positions_B[:, None]
    x = params["embed"]["embedding"].astype(cfg.dtype)[tokens_B][:, None]  # B1D
    cos, sin = rope_cos_sin(cfg, positions_BT)
    mask = attention_mask(positions_BT, None, next(iter(cache.values())).shape[2])
    new_cache = {}
    for key, moe in STACKS:
        if key not in layers:
            continue
        written = []
        for l, layer in enumerate(layers[key]):
            x, (latents, _) = Block(cfg, moe).apply(
                {"params": layer}, x, cos, sin, mask, positions_BT, cache[key][l]
            )
            written.append(latents)
        new_cache[key] = jnp.stack(written)
    x = RMSNorm(cfg).apply({"params": params["final_norm"]}, x)
    if cfg.tie_word_embeddings:
        logits = x @ params["embed"]["embedding"].astype(cfg.dtype).T
    else:
        logits = x @ params["lm_head"].astype(cfg.dtype)
    return logits[:, 0], new_cache


def stop_at_eos(tokens_B, done_B, eos: int | None):
    """Rows already done emit eos again; a row becomes done when it emits eos."""
    if eos is None:
        return tokens_B, done_B
    tokens_B = jnp.where(done_B, eos, tokens_B)
    return tokens_B, done_B | (tokens_B == eos)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "eos", "stream"),
)
def generate_padded(
    params: dict,
    tokens_BP: jnp.ndarray,
    lengths_B: jnp.ndarray,
    rng: jax.Array,
    *,
    cfg: ModelConfig,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos: int | None = None,
    stream: StreamFn | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The compiled generation: new tokens [B, N] and how many steps ran (< N if all stopped)."""
    b, p = tokens_BP.shape
    n = max_new_tokens
    choose = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)

    logits_BV, cache = prefill(cfg, params, tokens_BP, lengths_B, p + n)
    first_B, done_B = stop_at_eos(
        choose(logits_BV, jax.random.fold_in(rng, 0)), jnp.zeros(b, bool), eos
    )
    if stream is not None:
        jax.debug.callback(stream, 0, first_B, ordered=True)
    out_BN = jnp.full((b, n), 0 if eos is None else eos, jnp.int32).at[:, 0].set(first_B)

    def running(state):
        i, _, _, done_B, _ = state
        return (i < n) & ~jnp.all(done_B)

    layers = unstack_layers(params)

    def step(state):
        i, out_BN, last_B, done_B, cache = state
        logits_BV, cache = decode_step(cfg, params, layers, last_B, lengths_B + i - 1, cache)
        next_B, done_B = stop_at_eos(choose(logits_BV, jax.random.fold_in(rng, i)), done_B, eos)
        if stream is not None:
            jax.debug.callback(stream, i, next_B, ordered=True)
        out_BN = jax.lax.dynamic_update_slice(out_BN, next_B[:, None], (0, i))
        return i + 1, out_BN, next_B, done_B, cache

    steps, out_BN, *_ = jax.lax.while_loop(
        running, step, (jnp.int32(1), out_BN, first_B, done_B, cache)
    )
    return out_BN, steps


def generate(
    cfg: ModelConfig,
    params: dict,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos: int | None = None,
    stream: StreamFn | None = None,
) -> jnp.ndarray:
    """Samples `max_new_tokens` tokens after each prompt. Returns [B, N] int32.

    prompts: B sequences of token ids, of any lengths (or a [B, T] array). temperature 0 is
    greedy; top_k / top_p filter before sampling. A row that emits `eos` is done: it emits
    eos from then on, and the loop ends early once every row is done (eos None: never stop).
    `stream(step, tokens_B)` runs on the host as the tokens of each step are made; it is part
    of the compiled program, so pass the same function each call to avoid a recompile.
    """
    check_settings(temperature, top_k, top_p)
    if eos is not None and not 0 <= eos < cfg.vocab_size:
        raise ValueError(f"eos={eos}: outside the vocabulary [0, {cfg.vocab_size})")
    tokens_BP, lengths_B = pad_prompts(cfg, prompts, max_new_tokens)
    new_BN, _ = generate_padded(
        params,
        jnp.asarray(tokens_BP),
        jnp.asarray(lengths_B),
        jax.random.key(seed),
        cfg=cfg,
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=None if top_k is None else int(top_k),
        top_p=None if top_p is None else float(top_p),
        eos=None if eos is None else int(eos),
        stream=stream,
    )
    return new_BN
