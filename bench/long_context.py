"""Long context: what attention in blocks saves, and a long prefill that actually runs.

    python bench/long_context.py                  # memory: 32K prefill, 16K train step, both paths
    python bench/long_context.py --ab 512,1024,2048,4096 --rounds 5   # plain vs blocks, speed
    python bench/long_context.py --run 131072 --new 4    # a 128K prefill, then greedy tokens

The model is the `tiny` preset with DeepSeek-V2's YaRN (factor 40 over 4096 positions, so a
163840-token context), batch 1, fp32. "plain" is attention with every [B, H, T, S] score at
once (attention_block_size larger than the sequence); "blocks" is the blockwise online softmax
(model/attention.py) at the configured block size. Memory is read from the compiled program
(`memory_analysis().temp_size_in_bytes`): nothing is allocated, so the figures do not depend on
the machine or its load. --ab alternates the two paths round by round, so load hits both
alike, and prints the median ratio. --run times one real prefill (compile included) and the
decode after it, with the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import deepseek_jax as dj
from deepseek_jax.model.attention import default_block

PLAIN = 1 << 30  # a block no sequence reaches: the plain path everywhere


def long_tiny(block: int | None) -> dj.ModelConfig:
    return dj.preset("tiny").replace(
        rope_scaling=dj.YarnConfig(
            factor=40.0, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707
        ),
        max_position_embeddings=163840,
        attention_block_size=block,
    )


def prefill_fn(cfg):
    """Logits of the last position of one sequence (a generation prefill's forward)."""

    def prefill(params, tokens_BT):
        last = jnp.full((tokens_BT.shape[0], 1), tokens_BT.shape[1] - 1)
        return dj.DeepSeekV2(cfg).apply({"params": params}, tokens_BT, logits_at_BK=last).logits

    return prefill


def train_fn(cfg):
    """Gradients of next-token cross-entropy plus the balance losses: a train step's work."""

    def loss(params, tokens_BT):
        out = dj.DeepSeekV2(cfg).apply({"params": params}, tokens_BT[:, :-1])
        logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1).mean()
        return nll + out.aux.total

    return jax.grad(loss)


def temp_bytes(fn, cfg, tokens: int) -> int:
    params = jax.eval_shape(lambda: dj.init_params(cfg, jax.random.key(0)))
    tokens_BT = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
    return jax.jit(fn).lower(params, tokens_BT).compile().memory_analysis().temp_size_in_bytes


def memory(block: int) -> None:
    print(f"temporary memory of the compiled program (tiny + YaRN, batch 1, block {block}):")
    print(f"{'':28s}{'plain':>12s}{'blocks':>12s}{'ratio':>8s}")
    for label, fn, tokens in (
        ("prefill 32K tokens", prefill_fn, 32768),
        ("train step 16K tokens", train_fn, 16384 + 1),
    ):
        plain = temp_bytes(fn(long_tiny(PLAIN)), long_tiny(PLAIN), tokens)
        blocks = temp_bytes(fn(long_tiny(block)), long_tiny(block), tokens)
        print(f"{label:28s}{plain / 2**30:9.2f} GiB{blocks / 2**30:9.2f} GiB{blocks / plain:8.3f}")


def ab(lengths: list[int], rounds: int, block: int) -> None:
    """Prefill and train-step time in blocks over the plain path, the two alternated per round."""
    print(f"plain vs blocks (block {block}); median over {rounds} alternated rounds")
    print(f"{'tokens':>8s}{'what':>12s}{'blocks / plain time':>22s}")
    for tokens in lengths:
        # At one block or less both configs take the plain path: compare with half blocks.
        size = min(block, tokens // 2)
        for what, make in (("prefill", prefill_fn), ("train step", train_fn)):
            n = tokens + (what == "train step")
            runs = {}
            for name, b in (("plain", PLAIN), ("blocks", size)):
                cfg = long_tiny(b)
                params = dj.init_params(cfg, jax.random.key(0))
                fn = jax.jit(make(cfg))
                x = jnp.asarray(np.random.RandomState(0).randint(0, 256, (1, n)), jnp.int32)
                jax.block_until_ready(fn(params, x))  # compile
                runs[name] = (fn, params, x)
            ratios = []
            for _ in range(rounds):
                seconds = {}
                for name, (fn, params, x) in runs.items():
                    start = time.perf_counter()
                    jax.block_until_ready(fn(params, x))
                    seconds[name] = time.perf_counter() - start
                ratios.append(seconds["blocks"] / seconds["plain"])
            print(
                f"{tokens:8d}{what:>12s}{statistics.median(ratios):14.2f} (blocks of {size}; "
                f"min {min(ratios):.2f}, max {max(ratios):.2f})"
            )


def run(tokens: int, new: int, block: int) -> None:
    cfg = long_tiny(block)
    params = dj.init_params(cfg, jax.random.key(0))
    prompt = np.random.RandomState(0).randint(0, 256, tokens)
    start = time.perf_counter()
    out = np.asarray(dj.generate(cfg, params, [prompt], max_new_tokens=new))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(
        f"{tokens}-token prefill + {new} greedy tokens (tiny + YaRN, block {block}): "
        f"{seconds:.1f} s, compile included; peak RSS {peak:.2f} GiB; tokens {out[0].tolist()}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block", type=int, default=None, help="default: the platform's")
    parser.add_argument("--ab", default=None, help="comma-separated lengths to time")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--run", type=int, default=None, help="prefill this many tokens")
    parser.add_argument("--new", type=int, default=4)
    args = parser.parse_args(argv)
    block = args.block or default_block()
    if args.ab:
        ab([int(n) for n in args.ab.split(",")], args.rounds, block)
    elif args.run:
        run(args.run, args.new, block)
    else:
        memory(block)


if __name__ == "__main__":
    main()
