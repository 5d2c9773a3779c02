"""Generation: a jitted prefill, then a decode loop that stays on the device.

Legend: B batch, P padded prompt length, N new tokens, S = P + N cache slots, V vocabulary.

    new_BN = generate(cfg, params, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.7)
    new_BN, logp_BN = generate(cfg, params, prompts, 32, 0.7, return_logprobs=True, mesh=mesh)

Prompts of different lengths share a batch: they are right-padded to P and the prefill is the
model's full (expanded-MLA) forward, whose causal mask keeps padding out of every real
position. Its latents fill the cache's first P slots; row b's first new token comes from its
logits at position len_b - 1. Each decode step feeds one token per row at position
len_b + i - 1 and writes its latent at that slot (slot index == position), so the padding
slots of a short row are overwritten before they are ever attended to. Decode runs MLA's
absorbed form over the latent cache inside one `lax.while_loop`: no Python per token.

With a `mesh` (the training mesh), generation runs on params where they lie: prompts and the
cache are split on the batch by `deepseek_jax.parallel.rules` (replicated when the batch does
not divide the token axes) and the MoE dispatches over the "expert" axis, so GRPO samples the
state being trained without a copy (docs/design.md 5).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.generate.cache import write_prefix
from deepseek_jax.generate.sampling import check_settings, sample, sampled_logprobs
from deepseek_jax.model.layers import RMSNorm
from deepseek_jax.model.rope import rope_cos_sin
from deepseek_jax.model.transformer import Block, DeepSeekV2, attention_mask, init_cache
from deepseek_jax.parallel import rules

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


def batch_splits(mesh: Mesh | None, batch: int) -> bool:
    """Whether rows [B, ...] split over the mesh's token axes (else they stay replicated)."""
    if mesh is None:
        return False
    return batch % math.prod(mesh.shape[axis] for axis in rules.token_axes()) == 0


def moe_mesh(mesh: Mesh | None, batch: int) -> Mesh | None:
    """The mesh the MoE dispatches over: None (the plain path) on one device, where it is
    faster, and where the batch does not split (the sharded dispatch needs it to)."""
    return mesh if mesh is not None and mesh.size > 1 and batch_splits(mesh, batch) else None


def place(mesh: Mesh | None, x, logical: tuple[str | None, ...]):
    """Constrains x to the rules' sharding of `logical` when its batch splits, else replicates."""
    if mesh is None:
        return x
    if batch_splits(mesh, x.shape[logical.index("batch")]):
        return jax.lax.with_sharding_constraint(x, rules.activation_sharding(mesh, logical))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


def prefill(
    cfg: ModelConfig, params: dict, tokens_BP, lengths_B, cache_len: int, mesh: Mesh | None = None
) -> tuple[jnp.ndarray, dict]:
    """Full forward over right-padded prompts. Returns the logits [B, V] at each row's last
    real position and a cache of `cache_len` slots whose first P hold the prompts' latents."""
    b, p = tokens_BP.shape
    out = DeepSeekV2(cfg, mesh=moe_mesh(mesh, b)).apply({"params": params}, tokens_BP)
    logits_BV = out.logits[jnp.arange(b), lengths_B - 1]
    cache = write_prefix(init_cache(cfg, b, cache_len), out.cache)
    return logits_BV, place_cache(mesh, cache)


def place_cache(mesh: Mesh | None, cache: dict) -> dict:
    logical = ("layers", "batch", "cache_length", "latent")
    return jax.tree.map(lambda x: place(mesh, x, logical), cache)


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
    cfg: ModelConfig,
    params: dict,
    layers: dict,
    tokens_B,
    positions_B,
    cache: dict,
    mesh: Mesh | None = None,
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
            x, (latents, _) = Block(cfg, moe, mesh=moe_mesh(mesh, len(tokens_B))).apply(
                {"params": layer}, x, cos, sin, mask, positions_BT, cache[key][l]
            )
            written.append(latents)
        new_cache[key] = jnp.stack(written)
    x = RMSNorm(cfg).apply({"params": params["final_norm"]}, x)
    if cfg.tie_word_embeddings:
        logits = x @ params["embed"]["embedding"].astype(cfg.dtype).T
    else:
        logits = x @ params["lm_head"].astype(cfg.dtype)
    return logits[:, 0], place_cache(mesh, new_cache)


def stop_at_eos(tokens_B, done_B, eos: int | None):
    """Rows already done emit eos again; a row becomes done when it emits eos."""
    if eos is None:
        return tokens_B, done_B
    tokens_B = jnp.where(done_B, eos, tokens_B)
    return tokens_B, done_B | (tokens_B == eos)


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "eos",
        "stream",
        "mesh",
        "with_logprobs",
    ),
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
    mesh: Mesh | None = None,
    with_logprobs: bool = False,
) -> tuple[jnp.ndarray, ...]:
    """The compiled generation: new tokens [B, N] and how many steps ran (< N if all stopped);
    with_logprobs: (tokens [B, N], their log-probs [B, N], steps)."""
    b, p = tokens_BP.shape
    n = max_new_tokens
    choose = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)
    tokens_BP = place(mesh, tokens_BP, ("batch", "length"))

    logits_BV, cache = prefill(cfg, params, tokens_BP, lengths_B, p + n, mesh)
    first_B, done_B = stop_at_eos(
        choose(logits_BV, jax.random.fold_in(rng, 0)), jnp.zeros(b, bool), eos
    )
    if stream is not None:
        jax.debug.callback(stream, 0, first_B, ordered=True)
    out_BN = jnp.full((b, n), 0 if eos is None else eos, jnp.int32).at[:, 0].set(first_B)
    logp_BN = jnp.zeros((b, n), jnp.float32).at[:, 0].set(sampled_logprobs(logits_BV, first_B))

    def running(state):
        i, _, _, _, done_B, _ = state
        return (i < n) & ~jnp.all(done_B)

    layers = unstack_layers(params)

    def step(state):
        i, out_BN, logp_BN, last_B, done_B, cache = state
        logits_BV, cache = decode_step(cfg, params, layers, last_B, lengths_B + i - 1, cache, mesh)
        next_B, done_B = stop_at_eos(choose(logits_BV, jax.random.fold_in(rng, i)), done_B, eos)
        if stream is not None:
            jax.debug.callback(stream, i, next_B, ordered=True)
        out_BN = jax.lax.dynamic_update_slice(out_BN, next_B[:, None], (0, i))
        logp_B1 = sampled_logprobs(logits_BV, next_B)[:, None]
        logp_BN = jax.lax.dynamic_update_slice(logp_BN, logp_B1, (0, i))
        return i + 1, out_BN, logp_BN, next_B, done_B, cache

    steps, out_BN, logp_BN, *_ = jax.lax.while_loop(
        running, step, (jnp.int32(1), out_BN, logp_BN, first_B, done_B, cache)
    )
    return (out_BN, logp_BN, steps) if with_logprobs else (out_BN, steps)


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
    return_logprobs: bool = False,
    mesh: Mesh | None = None,
) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
    """Samples `max_new_tokens` tokens after each prompt. Returns [B, N] int32, and with
    `return_logprobs` also [B, N] float32 log pi(token | prefix) of each sampled token under
    the model's own distribution (softmax of the logits at temperature 1, before top-k/top-p):
    the log-probability a teacher-forced forward gives the same tokens, which GRPO's ratio
    pi / pi_old needs. After a row's eos they are eos's log-probs: mask them out.

    prompts: B sequences of token ids, of any lengths (or a [B, T] array). temperature 0 is
    greedy; top_k / top_p filter before sampling. A row that emits `eos` is done: it emits
    eos from then on, and the loop ends early once every row is done (eos None: never stop).
    `stream(step, tokens_B)` runs on the host as the tokens of each step are made; it is part
    of the compiled program, so pass the same function each call to avoid a recompile.
    `mesh`: run on that mesh with `params` where they lie (placed by `rules.param_shardings`).
    """
    check_settings(temperature, top_k, top_p)
    if eos is not None and not 0 <= eos < cfg.vocab_size:
        raise ValueError(f"eos={eos}: outside the vocabulary [0, {cfg.vocab_size})")
    tokens_BP, lengths_B = pad_prompts(cfg, prompts, max_new_tokens)
    if mesh is not None:  # a no-op for params already placed by the rules (a training state)
        params = rules.shard_params(cfg, params, mesh)
    out = generate_padded(
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
        mesh=mesh,
        with_logprobs=return_logprobs,
    )
    return out[:2] if return_logprobs else out[0]
