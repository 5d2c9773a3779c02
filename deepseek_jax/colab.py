"""Installing deepseek-jax on a notebook runtime (Colab): the JAX build the accelerator needs,
then a check of what JAX actually sees, and a plain word when the runtime must restart.

The notebooks' first cell installs the package from `REPO_URL` (refused while it still holds
the placeholder), then runs `python -m deepseek_jax.colab --repo URL --kernel_versions ...` in
a fresh process, which

1. guesses the accelerator from the machine (`runtime_hint`: TPU device files or variables,
   an NVIDIA driver), since a CPU-only jax sees no TPU or GPU;
2. installs the matching extra (`install_plan`: `[tpu]` = jax with its libtpu, `[cuda12]` =
   jax with its CUDA plugin, nothing more for the CPU);
3. asks a fresh python which backend JAX sees (`backend_seen`) and says whether that is what
   the runtime should give and whether the kernel must restart (`verdict`): a kernel that had
   already imported jax or numpy keeps the old versions until it restarts.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys

from deepseek_jax.cli.parser import Parser
from deepseek_jax.errors import UserError, report_errors

# Where the notebooks install from. The project's public home is not settled: the notebooks'
# install cells and README's Colab links carry this placeholder, and nothing installs until a
# reader (or the maintainers, once) sets the real URL. tests/test_notebooks.py keeps every copy
# equal to this one.
PLACEHOLDER = "OWNER_UNSET"
REPO_URL = f"https://github.com/{PLACEHOLDER}/deepseek-jax"

KINDS = ("tpu", "gpu", "cpu")
EXTRAS = {"tpu": "tpu", "gpu": "cuda12", "cpu": None}
# Packages whose version a running kernel keeps in memory: if the install changed one the kernel
# had imported, only a restart brings the new one in.
WATCHED = ("jax", "jaxlib", "numpy", "flax", "ml_dtypes")
TPU_VARIABLES = ("TPU_ACCELERATOR_TYPE", "TPU_NAME", "COLAB_TPU_ADDR", "TPU_WORKER_ID")
# TPU VMs up to v4 expose /dev/accel*, v5e and later /dev/vfio/*; Colab's older TPU nodes set
# COLAB_TPU_ADDR only.
TPU_FILES = ("/dev/accel0", "/dev/vfio/0")


def check_repo(repo: str) -> None:
    if PLACEHOLDER in repo or not repo.strip():
        raise UserError(
            f"REPO_URL={repo!r}: set it to the repository to install from, e.g. "
            "https://github.com/<account>/deepseek-jax (nothing was installed)"
        )


def runtime_hint(environ=None, exists=os.path.exists, which=shutil.which) -> str:
    """ "tpu", "gpu" or "cpu": the accelerator this machine appears to have, before any JAX
    build is installed (the arguments stand in for the machine in tests)."""
    environ = os.environ if environ is None else environ
    if any(environ.get(k) for k in TPU_VARIABLES) or any(exists(f) for f in TPU_FILES):
        return "tpu"
    if which("nvidia-smi") or exists("/dev/nvidia0"):
        return "gpu"
    return "cpu"


def install_plan(runtime: str, repo: str = REPO_URL, extra: tuple[str, ...] = ()) -> list[str]:
    """The `pip install` arguments for a runtime kind: the package with its JAX extra."""
    check_repo(repo)
    if runtime not in KINDS:
        raise UserError(f"runtime={runtime!r}: choose one of {KINDS}")
    name = f"deepseek-jax[{EXTRAS[runtime]}]" if EXTRAS[runtime] else "deepseek-jax"
    return ["install", "-q", f"{name} @ git+{repo}", *extra]


def backend_seen() -> str:
    """What a fresh python's JAX runs on: "tpu", "gpu" or "cpu"."""
    code = "import jax; print(jax.default_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 else "none"


def installed_versions(names=WATCHED) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def verdict(expected: str, seen: str, kernel: dict[str, str], now: dict[str, str]) -> str:
    """One paragraph for the notebook: is JAX on the expected backend, must the kernel restart.

    kernel: versions the notebook's kernel had imported before the install; now: installed."""
    changed = sorted(n for n, v in kernel.items() if now.get(n, v) != v)
    lines = []
    if seen == expected:
        lines.append(f"JAX sees the {seen.upper()}: ready.")
    else:
        lines.append(
            f"JAX sees {seen!r} but this runtime looked like a {expected.upper()} one: check "
            "Runtime > Change runtime type, or read the install output above."
        )
    if changed:
        was = ", ".join(f"{n} {kernel[n]} -> {now[n]}" for n in changed)
        lines.append(
            f"RESTART THE RUNTIME NOW (Runtime > Restart session), then run the notebook from "
            f"the cell after this one: this kernel had imported the old {was}."
        )
    return "\n".join(lines)


def parse_versions(text: str) -> dict[str, str]:
    """'jax=0.4.33,numpy=2.0.2' -> {'jax': '0.4.33', 'numpy': '2.0.2'}"""
    return dict(p.split("=", 1) for p in filter(None, text.split(",")))


@report_errors("python -m deepseek_jax.colab")
def main(argv: list[str] | None = None) -> None:
    p = Parser("python -m deepseek_jax.colab", __doc__)
    p.add_argument("--repo", default=REPO_URL, help="the git URL to install from")
    p.add_argument("--runtime", choices=KINDS, help="instead of guessing it from the machine")
    p.add_argument("--extra", nargs="*", default=[], help="more packages to install alongside")
    p.add_argument(
        "--kernel_versions", default="", help="name=version of what the kernel had imported"
    )
    args = p.parse_args(argv)
    runtime = args.runtime or runtime_hint()
    pip = install_plan(runtime, args.repo, tuple(args.extra))
    print(f"runtime: {runtime}; pip {' '.join(pip)}", flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", *pip])
    print(
        verdict(runtime, backend_seen(), parse_versions(args.kernel_versions), installed_versions())
    )


if __name__ == "__main__":
    main()
