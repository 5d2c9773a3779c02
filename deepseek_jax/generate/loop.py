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

The decode loop runs the layers one by one on per-layer params (`unstack_params`): given the
stacked params of training and checkpoints, `generate` splits them inside the compiled
program, a second copy of every layer's weights for the length of the call. To sample with
one copy, split them once, deleting the stacked arrays as they go:
`params = dj.unstack_params(cfg, params, delete=True)`; `generate` then runs prefill and
decode on them as they are (one device, or a mesh of one: `placement` places only the
stacked tree).

With a `mesh` (the training mesh), generation runs on params where they lie: prompts and the
cache are split on the batch by `deepseek_jax.parallel.rules` (the batch padded to divide
the token axes, generate/batch.py) and the MoE dispatches over the "expert" axis, so GRPO
samples the state being trained without a copy (docs/design.md 5).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig, resolve_dtype
from deepseek_jax.errors import UserError
from deepseek_jax.generate import batch
from deepseek_jax.generate.cache import write_prefix
from deepseek_jax.generate.sampling import check_settings, sample, sampled_logprobs
from deepseek_jax.model.attention import default_block
from deepseek_jax.model.transformer import DeepSeekV2, init_cache, unstack_params
from deepseek_jax.parallel import placement, rules

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
    return batch % rules.token_devices(mesh) == 0


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
    real position (the only ones computed) and a cache of `cache_len` slots whose first P hold
    the prompts' latents."""
    b, p = tokens_BP.shape
    cfg = resolve_dtype(cfg, mesh)  # the cache's dtype too
    stacked = not split_by_layer(params)
    out = DeepSeekV2(cfg, mesh=moe_mesh(mesh, b), scan_layers=stacked).apply(
        {"params": params}, tokens_BP, logits_at_BK=(lengths_B - 1)[:, None]
    )
    latents = {key: v if stacked else jnp.stack(v) for key, v in out.cache.items()}
    cache = write_prefix(init_cache(cfg, b, cache_len), latents)
    return out.logits[:, 0], place_cache(mesh, cache)


def split_by_layer(params: dict) -> bool:
    """Whether `params` are per layer (`unstack_params`) rather than stacked [L, ...]."""
    return not any(key.endswith("_layers") for key in params)


def cache_slots(cfg: ModelConfig, length: int) -> int:
    """Slots for `length` positions, rounded up to whole attention blocks once it exceeds one,
    so the blocked decode reads the cache as it is instead of padding a copy every step."""
    block = cfg.attention_block_size or default_block()
    return length if length <= block else -(-length // block) * block


def place_cache(mesh: Mesh | None, cache: dict) -> dict:
    """Places a cache, stacked ([L, B, S, C+R] per key) or per layer (lists of [B, S, C+R])."""
    logical = ("layers", "batch", "cache_length", "latent")
    return jax.tree.map(lambda x: place(mesh, x, logical[-x.ndim :]), cache)


def decode_step(
    cfg: ModelConfig,
    layer_params: dict,
    tokens_B,
    positions_B,
    cache: dict,
    mesh: Mesh | None = None,
) -> tuple[jnp.ndarray, dict]:
    """One token per row at `positions_B`: logits [B, V] and the updated cache.

    The model itself with `scan_layers=False` on `layer_params = unstack_params(cfg, params)`
    (split once, before the loop): MLA's absorbed form over the latent cache [B, S, C + R] of
    each layer. `cache` is stacked ({key: [L, B, S, C+R]}, as `prefill` makes it) or per
    layer ({key: L arrays [B, S, C+R]}, `per_layer(cache)`: the loop's carry, where each
    step writes one slot of each array in place instead of copying the whole cache); it
    comes back in the form it came. Tests hold every position's logits to the full forward's.
    """
    cfg = resolve_dtype(cfg, mesh)
    model = DeepSeekV2(cfg, mesh=moe_mesh(mesh, len(tokens_B)), scan_layers=False)
    out = model.apply(
        {"params": layer_params}, tokens_B[:, None], positions_B[:, None], cache=cache
    )
    new = out.cache
    if not all(isinstance(layers, list) for layers in cache.values()):
        new = {key: jnp.stack(layers) for key, layers in new.items()}
    return out.logits[:, 0], place_cache(mesh, new)


def per_layer(cache: dict) -> dict:
    """{key: [L, B, S, C+R]} -> {key: L arrays [B, S, C+R]}: the decode loop's carry."""
    return {key: list(stacked) for key, stacked in cache.items()}


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

    logits_BV, cache = prefill(cfg, params, tokens_BP, lengths_B, cache_slots(cfg, p + n), mesh)
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

    layer_params = params if split_by_layer(params) else unstack_params(cfg, params)

    def step(state):
        i, out_BN, logp_BN, last_B, done_B, cache = state
        positions_B = lengths_B + i - 1
        logits_BV, cache = decode_step(cfg, layer_params, last_B, positions_B, cache, mesh)
        next_B, done_B = stop_at_eos(choose(logits_BV, jax.random.fold_in(rng, i)), done_B, eos)
        if stream is not None:
            jax.debug.callback(stream, i, next_B, ordered=True)
        out_BN = jax.lax.dynamic_update_slice(out_BN, next_B[:, None], (0, i))
        logp_B1 = sampled_logprobs(logits_BV, next_B)[:, None]
        logp_BN = jax.lax.dynamic_update_slice(logp_BN, logp_B1, (0, i))
        return i + 1, out_BN, logp_BN, next_B, done_B, cache

    steps, out_BN, logp_BN, *_ = jax.lax.while_loop(
        running, step, (jnp.int32(1), out_BN, logp_BN, first_B, done_B, per_layer(cache))
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
    `mesh`: run on that mesh with `params` where they lie (placed by `placement.param_shardings`).
    `params` stacked, as training and checkpoints hold them, or per layer (`unstack_params`,
    one device or a mesh of one): then the call holds no second copy of the weights (module
    docstring).
    """
    check_settings(temperature, top_k, top_p, max_new_tokens)
    split = split_by_layer(params)
    if split and mesh is not None and mesh.size > 1:
        raise UserError(
            f"per-layer params (unstack_params) run on one device, not a mesh of {mesh.size}: "
            "pass the stacked params (placement.shard_params places them)"
        )
    if eos is not None and not 0 <= eos < cfg.vocab_size:
        raise ValueError(f"eos={eos}: outside the vocabulary [0, {cfg.vocab_size})")
    tokens_BP, lengths_B = pad_prompts(cfg, prompts, max_new_tokens)
    b = len(lengths_B)  # rows past b pad the batch to the mesh (generate/batch.py)
    tokens_BP, lengths_B = batch.pad_rows(mesh, tokens_BP, lengths_B)
    if mesh is not None and not split:  # a no-op for params placed by the rules (training)
        params = placement.shard_params(cfg, params, mesh)
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
        stream=batch.trimmed(stream, b),
        mesh=mesh,
        with_logprobs=return_logprobs,
    )
    return (out[0][:b], out[1][:b]) if return_logprobs else out[0][:b]
