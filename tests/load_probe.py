"""Loads an HF checkpoint onto a mesh in a fresh process and prints what it cost, as JSON.

    python tests/load_probe.py DIR expert=8                     # one process, its devices
    python tests/load_probe.py DIR expert=8 ADDRESS RANK 2      # one of two gloo processes

Printed: peak resident memory (VmHWM, reset just before the load) above the resident memory
before it (with LOAD_PROBE_SAVE=1 or =DIR, also that of saving the loaded params back,
`save_peak`); the bytes this process's devices hold; the bytes it read from the checkpoint; the
largest HF tensor and the largest one-layer block of a leaf; and whether every shard equals
the plain numpy reading of the same tensors (`check`, an extra argument).
"""

import ctypes
import gc
import json
import os
import sys
import tempfile

import jax
import numpy as np


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(directory: str, mesh_flag: str, address=None, rank=None, processes=None, check=""):
    if address is not None:
        from deepseek_jax.parallel.mesh import start_processes

        start_processes(address, int(processes), int(rank))
    from deepseek_jax.checkpoint import hf
    from deepseek_jax.parallel.mesh import make_mesh, parse_mesh

    if os.environ.get("LOAD_PROBE_LAYERWISE"):  # the path of blocks too big for one host copy
        hf.LAYERWISE_BYTES = 0
    mesh = make_mesh(**parse_mesh(mesh_flag))
    cfg, tensors = hf.open_checkpoint(directory)
    cfg = cfg.replace(param_dtype="float32", dtype="float32")
    shardings = hf.placement(cfg, mesh)
    # A first load compiles the per-leaf programs (some MB of code that stays); then its
    # arrays go and their pages go back to the system, so the baseline holds no data.
    jax.block_until_ready(hf.read_params(cfg, hf.TensorDirectory(directory), shardings)[0])
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
    before = status("VmRSS")
    params, bytes_read = hf.read_params(cfg, tensors, shardings)
    jax.block_until_ready(params)
    peak = status("VmHWM") - before
    leaves = jax.tree.leaves(params)
    placed = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
    sizes = [tensors[k].nbytes for k in tensors.keys()]
    layer_blocks = [x.nbytes // (x.shape[0] if x.ndim > 2 else 1) for x in leaves]
    result = {
        "peak": peak,
        "placed": placed,
        "read": bytes_read,
        "checkpoint": sum(sizes),
        "largest_tensor": max(sizes),
        "largest_layer_block": max(layer_blocks),
    }
    target = os.environ.get("LOAD_PROBE_SAVE")
    if target:  # then save it back from the mesh: its peak too
        with tempfile.TemporaryDirectory() as scratch:
            # "1": a scratch directory; else DIR/rank{i}, so that a test can see that only
            # process 0 wrote (every process takes part in the gathers).
            out = scratch if target == "1" else f"{target}/rank{jax.process_index()}"
            hf.save_hf(out, cfg, params, max_shard_bytes=64 << 20)  # compiles the gathers
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = status("VmRSS")
            hf.save_hf(out, cfg, params, max_shard_bytes=64 << 20)
            result["save_peak"] = status("VmHWM") - before
    if check:
        from deepseek_jax.checkpoint.safetensors_io import TensorDirectory

        plain = TensorDirectory(directory)
        cfg_plain = cfg
        ok = True
        sources = hf.leaf_sources(cfg_plain)
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        for path, x in flat:
            name = "/".join(str(k.key) for k in path)
            for shard in x.addressable_shards:
                bounds = tuple(s.indices(n)[:2] for s, n in zip(shard.index, x.shape, strict=True))
                expected = hf.read_block(cfg, plain, sources[name], x.shape, bounds)
                ok &= bool(np.array_equal(np.asarray(shard.data), expected))
        result["shards_equal"] = ok
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
