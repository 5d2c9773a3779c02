"""Our jitted train step (forward, backward, AdamW) vs transformers' PyTorch one, on the CPU.

    python bench/train_step.py                     # `small` preset, batch 4 x 256
    python bench/train_step.py --preset tiny --batch 16 --seq 256

Our layer stack runs unrolled by default (`scan_unroll` = the layer count, as
configs/default.py runs `tiny`): on XLA:CPU a rolled `nn.scan` copies each layer's weights out
of the stacked arrays and writes its residuals into zero-filled stacks: 6-14% of these
steps (README, "Measured figures").
Same weights (ours written with save_hf, read by `from_pretrained`), same batch, same
optimizer settings, one process. PyTorch runs with transformers' defaults (SDPA attention,
grouped_mm experts, as `from_pretrained` picks them; the line printed names them). Each step
is timed --repeats times (at least 3) after a warm-up step; prints min and median of each,
the ratio of medians, and our MFU (median) against the fp32 matmul peak measured at start. Model FLOPs = 6 x active params x tokens + attention
(scores and values, fwd + bwd); the routed-expert tile padding is not counted.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from timing import line, median, timed  # bench/timing.py: the script's folder is on sys.path

import deepseek_jax as dj
from deepseek_jax.checkpoint.hf import save_hf
from deepseek_jax.sizes import param_counts
from deepseek_jax.train import optimizer as opt
from deepseek_jax.train import step as steps
from deepseek_jax.train.settings import OptimizerSettings


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GEMM rate of this machine through XLA, FLOP/s."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def model_flops(cfg: dj.ModelConfig, batch: int, seq: int) -> float:
    attention = 2 * batch * seq * seq * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return 6 * param_counts(cfg)["active"] * batch * seq + 3 * cfg.num_hidden_layers * attention


def ours(cfg, oc, batch_np, repeats):
    optimizer = opt.make_optimizer(oc, 1000)
    mesh = dj.make_mesh()
    state, shardings = steps.init_sharded_state(cfg, optimizer, 0, mesh)
    params = jax.device_get(state.params)
    train_step = steps.make_train_step(
        cfg, optimizer, opt.schedule(oc, 1000), mesh, shardings, micro_steps=1
    )
    batch = steps.global_batch(mesh, batch_np)
    holder = [state]

    def run():
        holder[0], metrics = train_step(holder[0], batch)
        jax.block_until_ready(metrics)

    return timed(run, repeats), params


def pytorch(cfg, oc, params, batch_np, repeats):
    with tempfile.TemporaryDirectory() as d:
        save_hf(d, cfg, params)
        model = transformers.DeepseekV2ForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(oc.b1, oc.b2), eps=oc.eps, weight_decay=oc.weight_decay
    )
    # Our rows are [tokens | one more]: HF shifts labels itself, so give it the whole row.
    ids = torch.from_numpy(
        np.concatenate([batch_np["inputs"], batch_np["targets"][:, -1:]], axis=1)
    ).long()

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), oc.clip_norm)
        optimizer.step()

    attn = model.config._attn_implementation
    experts = getattr(model.config, "_experts_implementation", "?")
    return timed(run, repeats), f"transformers ({attn}, experts {experts})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each (>= 3)")
    parser.add_argument(
        "--scan-unroll", type=int, default=None, help="layers per nn.scan iteration (default: all)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count())

    cfg = dj.preset(args.preset)
    cfg = cfg.replace(scan_unroll=args.scan_unroll or cfg.num_hidden_layers)
    oc = OptimizerSettings(warmup_steps=10)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1)),
        "segment_ids": np.zeros((args.batch, args.seq), np.int32),
        "weights": np.ones((args.batch, args.seq), np.float32),
    }
    peak = matmul_peak()
    jax_s, params = ours(cfg, oc, batch, args.repeats)
    torch_s, label = pytorch(cfg, oc, params, batch, args.repeats)
    n = args.batch * args.seq
    flops = model_flops(cfg, args.batch, args.seq)
    print(
        f"preset {args.preset}, batch {args.batch} x {args.seq}, scan_unroll {cfg.scan_unroll}, "
        f"{os.cpu_count()} CPU cores"
    )
    print(f"fp32 matmul peak      {peak / 1e9:8.1f} GFLOP/s")
    print(line("deepseek-jax (JAX)", jax_s, n))
    print(line(label, torch_s, n))
    print(f"ratio JAX / torch (medians) {median(torch_s) / median(jax_s):8.2f} x")
    mfu = flops / median(jax_s) / peak
    print(f"our MFU (median)      {mfu:8.1%}  ({flops / 1e9:.1f} GFLOP a step)")


if __name__ == "__main__":
    main()
