"""Loss curves, an expert-load heatmap and the MoE dispatch (drop rate, device fan-out) of a
train.py run, as PNG files in the run dir.

python -m deepseek_jax.train.plot runs/default    # -> loss.png, expert_load.png, dispatch.png
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training machine
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax.cli.parser import Parser  # noqa: E402
from deepseek_jax.errors import UserError, report_errors  # noqa: E402
from deepseek_jax.train.metrics import read  # noqa: E402


def latest_by_step(records: list[dict], kind: str) -> list[dict]:
    """One record per step, the last written: a resumed run logs its replayed steps again."""
    by_step = {r["step"]: r for r in records if r["kind"] == kind}
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(train: list[dict], evals: list[dict], path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["ce"] for r in train], label="train cross-entropy")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_load(record: dict, path: str) -> None:
    """Heatmap of [L_moe, E]: each expert's share of its layer's assignments x E (1 = even)."""
    load = np.asarray(record["load"])
    fig, ax = plt.subplots(figsize=(max(4, load.shape[1] * 0.35), 1 + load.shape[0] * 0.5))
    image = ax.imshow(load * load.shape[1], aspect="auto", cmap="viridis")
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"expert load x E at step {record['step']} (1 = balanced)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_dispatch(train: list[dict], path: str) -> None:
    """Per MoE layer over steps: share of assignments dropped, and devices per token."""
    steps = [r["step"] for r in train]
    fig, (drop, fan) = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax, style in (
        ("drop_rate", drop, "-"),
        ("never_drop_drop_rate", drop, ":"),
        ("fanout_mean", fan, "-"),
        ("fanout_max", fan, ":"),
    ):
        values = np.asarray([r[key] for r in train])  # [steps, L_moe]
        for layer in range(values.shape[1]):
            ax.plot(steps, values[:, layer], style, label=f"{key} layer {layer}")
    drop.set_title("assignments dropped (never-drop tokens dotted: must be 0)")
    fan.set_title("devices a token reached: mean, max dotted (<= M)")
    for ax in (drop, fan):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_run(run_dir: str) -> list[str]:
    """Writes the PNGs and returns their paths."""
    records = read(run_dir)
    train = latest_by_step(records, "train")
    if not train:
        raise ValueError(f"{run_dir} has no train records yet: wait for train.log_every steps")
    paths = [os.path.join(run_dir, "loss.png")]
    plot_loss(train, latest_by_step(records, "eval"), paths[0])
    if np.asarray(train[-1]["load"]).size:
        paths.append(os.path.join(run_dir, "expert_load.png"))
        plot_load(train[-1], paths[1])
    if np.asarray(train[-1].get("drop_rate", [])).size:
        paths.append(os.path.join(run_dir, "dispatch.png"))
        plot_dispatch(train, paths[-1])
    return paths


@report_errors("python -m deepseek_jax.train.plot")
def main(argv: list[str] | None = None) -> None:
    parser = Parser("python -m deepseek_jax.train.plot", __doc__)
    parser.add_argument("run_dir")
    run_dir = parser.parse_args(argv).run_dir
    try:
        paths = plot_run(run_dir)
    except FileNotFoundError as e:  # the path is the user's
        raise UserError(str(e)) from e
    print("\n".join(paths))


if __name__ == "__main__":
    main()
