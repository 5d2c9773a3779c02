"""Metrics out of the loop: one JSON line per record (metrics.jsonl) and TensorBoard events.

Records carry a "kind": "train" (loss, rates, expert load [L_moe, E]) or "eval".
`deepseek_jax.train.plot` draws them.

A run resumed from step S trains steps S + 1, ... again, so `MetricsLog(run_dir, resumed=S)`
first drops the records past S that the interrupted run wrote (metrics.jsonl is rewritten
atomically) and tells TensorBoard to purge its events from S + 1 on: each step is held once.
"""

from __future__ import annotations

import json
import os

import numpy as np
from tensorboardX import SummaryWriter

METRICS = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: str, resumed: int | None = None):
        path = os.path.join(run_dir, METRICS)
        if resumed is not None and os.path.exists(path):
            keep = [r for r in read(run_dir) if r["step"] <= resumed]
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(path + ".tmp", path)
        self.file = open(path, "a")  # noqa: SIM115  (closed in close())
        purge = None if resumed is None else resumed + 1
        self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge)

    def write(self, kind: str, step: int, values: dict) -> None:
        record = {"kind": kind, "step": step}
        for key, value in values.items():
            value = np.asarray(value)
            record[key] = value.tolist() if value.ndim else float(value)
            if key == "load":
                # Max share x E per MoE layer: 1.0 is a perfect balance, E all on one expert.
                for layer, share in enumerate(value):
                    self.writer.add_scalar(f"load_max/layer{layer}", share.max() * len(share), step)
            elif value.ndim == 0:
                self.writer.add_scalar(f"{kind}/{key}", float(value), step)
            elif value.ndim == 1:  # one value per MoE layer: drop rates, fan-out
                for layer, v in enumerate(value):
                    self.writer.add_scalar(f"{key}/layer{layer}", float(v), step)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        self.writer.close()


class Silent:
    """The log of processes other than 0: process 0 writes the one record every step."""

    def write(self, kind: str, step: int, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def read(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, METRICS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {run_dir!r} a train.py run directory?")
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i + 1 < len(lines):
                raise
            # A process killed mid-write leaves at most its last line cut short.
    return records
