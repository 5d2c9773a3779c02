"""One table for the day a TPU or GPU is at hand: V2-Lite-shaped train step, prefill, decode.

    python bench/device.py                # on a TPU/GPU: V2-Lite widths, as many layers as fit
    python bench/device.py --toy          # anywhere (the default on a CPU): small widths, a
                                          # check that the script runs, not a measurement

Rows: the train step's tokens/s and MFU (model FLOPs = 6 x active params x tokens + attention,
against the chip's bf16 peak), prefill tokens/s, and decode tokens/s at batch 1, 32 and 128
against the HBM roofline: one decode step must read the live latent cache (batch x context x
layers x (r_kv + dr) numbers) and the weights its tokens touch (all but the routed experts,
plus the expected number of distinct experts the batch picks); roofline time = those bytes /
HBM bandwidth. The kernels column is read from each compiled program: which Pallas kernels
(splash attention, megablox gmm, the latent decode kernel), cuDNN attention or the Mosaic GPU
grouped matmul it contains; "plain" when none. Goals (issue 16): decode >= 50% of the
roofline at batch 1, MoE train-step MFU >= 35%.
"""

from __future__ import annotations

import argparse
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

import deepseek_jax as dj
from deepseek_jax.config import resolve_dtype, v2_lite
from deepseek_jax.generate.loop import decode_step, prefill
from deepseek_jax.model.transformer import unstack_params
from deepseek_jax.sizes import param_counts
from deepseek_jax.train import optimizer as opt
from deepseek_jax.train import step as steps
from deepseek_jax.train.settings import OptimizerSettings

# Published dense bf16 peak FLOP/s and HBM bytes/s per chip, by device_kind substring.
CHIPS = {
    "TPU v4": (275e12, 1.2e12),
    "TPU v5 lite": (197e12, 0.82e12),
    "TPU v5e": (197e12, 0.82e12),
    "TPU v5p": (459e12, 2.76e12),
    "TPU v5": (459e12, 2.76e12),
    "TPU v6": (918e12, 1.64e12),
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.0e12),
}
# bytes per parameter a train state holds: fp32 params, AdamW's two fp32 moments, fp32 grads
TRAIN_BYTES_PER_PARAM = 16


def measured_peaks(dtype) -> tuple[float, float]:
    """Best GEMM FLOP/s and copy bytes/s of this device through XLA (for unknown chips)."""
    n = 4096 if jax.default_backend() != "cpu" else 1024
    a = jnp.ones((n, n), dtype)
    x = jnp.ones((64 * 2**20,), jnp.float32)
    gemm, copy = jax.jit(lambda a: a @ a), jax.jit(lambda x: x + 1)
    flops = 2 * n**3 / best_time(lambda: gemm(a).block_until_ready(), 5)
    bandwidth = 2 * x.nbytes / best_time(lambda: copy(x).block_until_ready(), 5)
    return flops, bandwidth


def best_time(fn, repeats: int) -> float:
    fn()  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def chip_peaks(dtype) -> tuple[float, float, str]:
    kind = jax.devices()[0].device_kind
    for name, (flops, bandwidth) in CHIPS.items():
        if name in kind:
            return flops, bandwidth, f"{kind} (published peaks)"
    flops, bandwidth = measured_peaks(dtype)
    return flops, bandwidth, f"{kind} (peaks measured here)"


def kernels_in(lowered) -> str:
    """Which fast paths a lowered program contains ("plain" when none)."""
    text = lowered.as_text()
    names = set(re.findall(r'kernel_name = "([^"]+)"', text))
    found = []
    if any(n.startswith("splash") for n in names):
        found.append("splash")
    if "kernel" in names:  # megablox names its Pallas kernels "kernel"
        found.append("megablox")
    if "mla_latent_decode" in names:
        found.append("pallas decode")
    if "cudnn" in text and "fmha" in text:
        found.append("cudnn attention")
    if "mosaic_gpu" in text:
        found.append("mosaic gpu gmm")
    return "+".join(found) or "plain"


def layers_that_fit(cfg: dj.ModelConfig, devices: int) -> int:
    """MoE layers whose train state fits in ~60% of the devices' memory (the rest for
    activations), with the embedding, head and the dense first layer; at least 2 layers."""
    stats = jax.devices()[0].memory_stats() or {}
    budget = 0.6 * stats.get("bytes_limit", 16 * 2**30) * devices
    base = param_counts(cfg.replace(num_hidden_layers=1))["total"]
    per_layer = param_counts(cfg.replace(num_hidden_layers=2))["total"] - base
    fit = int((budget / TRAIN_BYTES_PER_PARAM - base) // per_layer) + 1
    return max(2, min(fit, cfg.num_hidden_layers))


def model_flops(cfg: dj.ModelConfig, tokens: int, seq: int) -> float:
    """Train-step FLOPs: 6 x active params per token + causal attention, fwd + bwd."""
    heads = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    attention = cfg.num_hidden_layers * 2 * tokens * seq * heads  # half the T x S, x2 matmuls
    return 6 * param_counts(cfg)["active"] * tokens + 3 * attention


def decode_weight_bytes(cfg: dj.ModelConfig, batch: int, itemsize: int) -> float:
    """Weights one decode step reads: all but the routed experts, plus the expected number of
    distinct experts `batch` tokens pick per layer (uniform routing)."""
    one_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    routed = cfg.num_moe_layers * e * one_expert
    dense = param_counts(cfg)["total"] - routed - cfg.vocab_size * cfg.hidden_size
    picked = e * (1 - (1 - k / e) ** batch)
    return itemsize * (dense + cfg.num_moe_layers * picked * one_expert)


def bench_train(cfg, mesh, batch: int, seq: int, peak: float, repeats: int) -> dict:
    oc = OptimizerSettings(warmup_steps=1)
    optimizer = opt.make_optimizer(oc, 1000)
    state, shardings = steps.init_sharded_state(cfg, optimizer, 0, mesh)
    fn = steps.make_train_step(cfg, optimizer, opt.schedule(oc, 1000), mesh, shardings, 1)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))
    local = dict(
        inputs=tokens,
        targets=np.roll(tokens, -1, axis=1),
        positions=np.ascontiguousarray(positions),
        segment_ids=np.zeros_like(tokens),
        weights=np.ones((batch, seq), np.float32),
    )
    data = steps.global_batch(mesh, local)
    kernels = kernels_in(fn.lower(state, data))
    holder = {"state": state}

    def run():
        holder["state"], metrics = fn(holder["state"], data)
        jax.block_until_ready(metrics["loss"])

    seconds = best_time(run, repeats)
    tokens_per_s = batch * seq / seconds
    mfu = model_flops(cfg, batch * seq, seq) / seconds / (peak * mesh.size)
    return dict(
        path="train step", batch=batch, tokens_s=tokens_per_s, ms=1e3 * seconds,
        note=f"MFU {100 * mfu:.1f}% (goal 35%)", kernels=kernels, params=holder["state"].params,
    )  # fmt: skip


def bench_prefill(cfg, params, mesh, batch: int, seq: int, repeats: int) -> dict:
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (batch, seq)))
    lengths = jnp.full((batch,), seq, jnp.int32)
    fn = jax.jit(lambda p, t, n: prefill(cfg, p, t, n, seq, mesh))
    kernels = kernels_in(fn.lower(params, tokens, lengths))
    seconds = best_time(lambda: jax.block_until_ready(fn(params, tokens, lengths)), repeats)
    return dict(
        path="prefill", batch=batch, tokens_s=batch * seq / seconds, ms=1e3 * seconds,
        note=f"{seq} tokens a row", kernels=kernels,
    )  # fmt: skip


def bench_decode(cfg, params, mesh, batch, context, new, bandwidth, repeats) -> dict:
    """`new` decode steps in one compiled loop after a context of `context` slots per row."""
    slots = -(-(context + new) // 128) * 128  # the decode kernel reads whole 128-slot blocks
    cache = dj.init_cache(cfg, batch, slots)
    cache = jax.tree.map(
        lambda x: jax.random.normal(jax.random.key(2), x.shape, x.dtype), cache
    )  # a filled cache: prefill's values do not change the cost
    tokens = jnp.zeros((batch,), jnp.int32)

    def loop(params, tokens, cache):
        layers = unstack_params(cfg, params)

        def one(i, carry):
            tokens, cache = carry
            positions = jnp.full((batch,), context + i, jnp.int32)
            logits, cache = decode_step(cfg, layers, tokens, positions, cache, mesh)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, new, one, (tokens, cache))

    fn = jax.jit(loop)
    kernels = kernels_in(fn.lower(params, tokens, cache))
    seconds = best_time(lambda: jax.block_until_ready(fn(params, tokens, cache)), repeats) / new
    itemsize = jnp.dtype(cfg.dtype).itemsize
    cache_bytes = batch * (context + new / 2) * cfg.num_hidden_layers * cfg.latent_cache_dim
    step_bytes = cache_bytes * itemsize + decode_weight_bytes(cfg, batch, itemsize)
    roofline = step_bytes / (bandwidth * mesh.size)
    return dict(
        path="decode", batch=batch, tokens_s=batch / seconds, ms=1e3 * seconds,
        note=f"cache {cache_bytes * itemsize / 2**20:.1f} MiB/step, "
        f"{step_bytes / 2**20:.0f} MiB/step in all: {100 * roofline / seconds:.0f}% of roofline",
        kernels=kernels,
    )  # fmt: skip


def print_row(r: dict) -> None:
    print(
        f"| {r['path']} | {r['batch']} | {r['tokens_s']:,.0f} | {r['ms']:.2f} | "
        f"{r['kernels']} | {r['note']} |",
        flush=True,
    )


def bench_config(args, devices: int) -> dj.ModelConfig:
    # "auto" compute dtype: bf16 on the accelerator, fp32 on the CPU (a --toy check run).
    cfg = resolve_dtype(v2_lite().replace(kernels=args.kernels), jax.default_backend())
    if args.toy:
        cfg = cfg.replace(
            vocab_size=1024, hidden_size=256, num_attention_heads=4, kv_lora_rank=128,
            qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, intermediate_size=512,
            moe_intermediate_size=128, n_routed_experts=16, max_position_embeddings=4096,
        )  # fmt: skip
    layers = args.layers or layers_that_fit(cfg, devices)
    return cfg.replace(num_hidden_layers=layers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toy", action="store_true", help="small widths (default on a CPU)")
    parser.add_argument("--layers", type=int, default=0, help="0: as many as fit (2 with --toy)")
    parser.add_argument("--batch", type=int, default=0, help="train/prefill rows (0: auto)")
    parser.add_argument("--seq", type=int, default=0, help="train/prefill length (0: auto)")
    parser.add_argument("--decode_batches", default="", help="e.g. 1,32,128 (default)")
    parser.add_argument("--context", type=int, default=0, help="decode context (0: auto)")
    parser.add_argument("--kernels", default="auto", choices=dj.config.KERNELS)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    args.toy = args.toy or jax.default_backend() == "cpu"
    if args.toy and not args.layers:
        args.layers = 2

    devices = jax.device_count()
    mesh = dj.make_mesh(data=devices)
    cfg = bench_config(args, devices)
    peak, bandwidth, chip = chip_peaks(jnp.dtype(cfg.dtype))
    batch = args.batch or (2 if args.toy else 8 * devices)
    seq = args.seq or (128 if args.toy else 4096)
    context = args.context or (256 if args.toy else 4096)
    decode_batches = [int(b) for b in (args.decode_batches or "1,32,128").split(",")]
    if args.toy and not args.decode_batches:
        decode_batches = [1, 4, 8]

    counts = param_counts(cfg)
    print(
        f"{chip}, {devices} device(s): peak {peak / 1e12:.2f} TFLOP/s, HBM "
        f"{bandwidth / 1e9:.1f} GB/s a device; V2-Lite widths{' (toy)' if args.toy else ''}, "
        f"{cfg.num_hidden_layers} layers, {counts['total'] / 1e6:,.1f}M params "
        f"({counts['active'] / 1e6:,.1f}M active), {cfg.dtype} compute, kernels={cfg.kernels}"
    )
    # Each row prints as soon as it is measured: a run cut short still reports what it has.
    print("| path | batch | tokens/s | ms/step | kernels | against the peak |")
    print("|---|---:|---:|---:|---|---|")
    train = bench_train(cfg, mesh, batch, seq, peak, args.repeats)
    params = train.pop("params")
    print_row(train)
    print_row(bench_prefill(cfg, params, mesh, batch, seq, args.repeats))
    new = 16 if args.toy else 64
    for b in decode_batches:
        print_row(bench_decode(cfg, params, mesh, b, context, new, bandwidth, args.repeats))
    if args.toy:
        print("(toy sizes: a check that the script runs, not a measurement)")


if __name__ == "__main__":
    main()
