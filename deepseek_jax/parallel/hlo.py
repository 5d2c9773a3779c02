"""Costs read from a compiled XLA program's text (`jax.jit(f).lower(...).compile().as_text()`).

What a step costs at scale is measured from the program the compiler produced, not from
formulas (docs/design.md, "The device-level budget"):

    all_to_all_bytes(text)          bytes one device hands to all-to-all ops
    ragged_all_to_all_bytes(module)   the same for ragged_all_to_all, read from an exported
                                      StableHLO module (XLA:CPU compiles none: jax.export)
    dot_flops(text, scope="experts")  FLOPs of the dot ops under a jax.named_scope, per device

`compiled.cost_analysis()` counts a while loop's body once; `dot_flops` multiplies each body by
its `known_trip_count`, takes the larger branch of a conditional (an upper bound), and follows
fusions and calls, so a tiled loop (the grouped matmul) is counted at its compiled bound.
Pure text processing: imports nothing from the package.
"""

from __future__ import annotations

import math
import re

ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4}
ELEMENT_BYTES |= {"s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \((.*)\) -> .* \{$")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
CALLEES = re.compile(
    r"(?:calls|to_apply|body|true_computation|false_computation)=%?([\w.\-]+)"
    r"|branch_computations=\{([^}]*)\}"
)
TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _dims(shape_text: str) -> list[int]:
    match = SHAPE.search(shape_text)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines}, and the ENTRY computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = HEADER.match(line.strip())
        if header and line.rstrip().endswith("{"):
            current = header.group(1)
            comps[current] = [header.group(2)]  # first line: the parameters
            if line.startswith("ENTRY"):
                entry = current
        elif line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def all_to_all_bytes(text: str, last_dim: int | None = None) -> int:
    """Bytes of the results of every all-to-all in the program (= what one device sends in);
    with `last_dim`, only arrays of that minor dimension (e.g. D: the token rows, not their
    metadata)."""
    total = 0
    for line in text.splitlines():
        inst = INSTRUCTION.match(line)
        if not inst or inst.group(3) != "all-to-all":
            continue
        for dtype, dims in SHAPE.findall(inst.group(2)):
            shape = [int(d) for d in dims.split(",") if d]
            if last_dim is None or (shape and shape[-1] == last_dim):
                total += math.prod(shape) * ELEMENT_BYTES.get(dtype, 4)
    return total


RAGGED = re.compile(r"@ragged_all_to_all\(.*?\)\s*->\s*tensor<([\dx]+)x([a-z]+\d*)>")


def ragged_all_to_all_bytes(module: str, last_dim: int | None = None) -> int:
    """Bytes of the results of every ragged_all_to_all in a StableHLO module (the buffers one
    device receives into: its static bound, which the rows actually sent never exceed); with
    `last_dim`, only arrays of that minor dimension."""
    total = 0
    for dims, dtype in RAGGED.findall(module):
        shape = [int(d) for d in dims.split("x")]
        if last_dim is None or shape[-1] == last_dim:
            total += math.prod(shape) * ELEMENT_BYTES.get(dtype, 4)
    return total


def dot_flops(text: str, scope: str | None = None) -> float:
    """FLOPs of the dots one device runs (2 x output elements x contracted size), loop bodies
    times their trip counts; with `scope`, only dots under that jax.named_scope."""
    comps, entry = _computations(text)
    memo: dict[str, float] = {}

    def flops(name: str) -> float:
        if name in memo:
            return memo[name]
        memo[name] = 0.0  # guards recursion
        params, *lines = comps.get(name, [""])
        shapes = {
            p.split(":")[0].strip(): p.split(":", 1)[1] for p in params.split(", ") if ":" in p
        }
        total = 0.0
        for line in lines:
            inst = INSTRUCTION.match(line)
            if not inst:
                continue
            out_name, out_shape, op, rest = inst.groups()
            shapes[out_name] = out_shape
            if op in ("dot", "convolution"):
                op_name = re.search(r'op_name="([^"]*)"', rest)
                # A scope shows as ".../experts/..." or, under autodiff, "jvp(experts)/...".
                inside = op_name and re.search(rf"[/(]{scope}\)*/", op_name.group(1))
                if scope is None or inside:
                    lhs = re.match(r"\s*%?([\w.\-]+)", rest).group(1)
                    lhs_dims = _dims(shapes.get(lhs, ""))
                    contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
                    size = math.prod(lhs_dims[int(i)] for i in contract.group(1).split(",") if i)
                    total += 2.0 * math.prod(_dims(out_shape)) * size
                continue
            callees = []
            for single, many in CALLEES.findall(rest):
                callees += [single] if single else [c.strip().lstrip("%") for c in many.split(",")]
            if op == "while":
                trips = TRIP_COUNT.search(rest)
                body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
                total += (int(trips.group(1)) if trips else 1) * flops(body)
            elif op == "conditional":
                total += max((flops(c) for c in callees), default=0.0)
            else:
                total += sum(flops(c) for c in callees)
        memo[name] = total
        return total

    return flops(entry)
