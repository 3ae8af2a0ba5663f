"""Shared pieces of the experiments: the chain they run on, paired sampling, variance
statistics with confidence intervals, and table/figure writers.

Every experiment uses the same linear-Gaussian chain (``default_chain``): T = 50, d = 3,
W = 0.9 Q with Q a random orthogonal matrix (so a step's influence decays like 0.9^t
and truncation matters over tens of steps, as in a diffusion sampler whose steps are
near the identity), inherent noise sigma_t = 0.5 and parameter noise tau_t = 0.1 at
every step, reward R(x) = -|x - target|^2. Its objective and gradient are exact.
Both RL and RLR run on this same chain (docs/design.md: the paper's RL and RLR use
different samplers; here they do not).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from halforder.estimators import Plan
from halforder.estimators import draw_estimates, flatten
from halforder.toy import LinearGaussianChain, Quadratic

Z95 = 1.959963984540054
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "results"
QUICK_OUT = REPO / "runs" / "quick-results"


# ------------------------------------------------------------------------- the chain
@dataclass(frozen=True)
class ChainConfig:
    """The chain every experiment uses (see module docstring)."""

    T: int = 50
    d: int = 3
    rho: float = 0.9
    sigma: float = 0.5
    tau: float = 0.1
    seed: int = 0

    def describe(self) -> str:
        return (f"linear-Gaussian chain T={self.T}, d={self.d}, W = {self.rho} x random orthogonal, "
                f"sigma_t={self.sigma}, tau_t={self.tau} at every step, R(x) = -|x - target|^2, seed {self.seed}")


@lru_cache(maxsize=None)
def default_chain(cfg: ChainConfig = ChainConfig()):
    """(chain, params) for ``cfg``; W = rho Q, b ~ N(0, 0.1^2), target and x_T mean ~ N(0, I)."""
    g = torch.Generator().manual_seed(cfg.seed)
    Q, _ = torch.linalg.qr(torch.randn((cfg.d, cfg.d), generator=g, dtype=torch.float64))
    b = 0.1 * torch.randn((cfg.d,), generator=g, dtype=torch.float64)
    target = torch.randn((cfg.d,), generator=g, dtype=torch.float64)
    x_T_mean = torch.randn((cfg.d,), generator=g, dtype=torch.float64)
    chain = LinearGaussianChain(cfg.T, cfg.d, cfg.sigma, cfg.tau, Quadratic.target(target), x_T_mean)
    return chain, {"W": cfg.rho * Q, "b": b}


def exact_grad_vec(chain, params) -> torch.Tensor:
    return flatten(chain.exact_grad(params))


def ho_tiling(T: int, h: int) -> Plan:
    """FO on step 1 and HO blocks of length h tiling steps 2..T (the last may be shorter):
    an unbiased plan made of FO and HO only (works with tau = 0)."""
    if h < 1:
        raise ValueError(f"block length must be >= 1, got {h}")
    blocks = [(j, min(h, T - j + 1)) for j in range(2, T + 1, h)]
    return Plan.from_roles(["FO"] + ["HO"] * (T - 1), blocks=blocks, name=f"HO({h})")


def j_strata(T: int, h: int, k: int = 8) -> list[int]:
    """Evenly spaced block starts j in 2..T-h+1, as many as the largest power of two <= k
    that fits; RLR(h) draws j uniformly from them (any j distribution keeps RLR unbiased,
    docs/design.md, "Plan samplers"). A power of two so that 8 chunks split evenly into strata."""
    lo, hi = 2, T - h + 1
    m = 1
    while 2 * m <= min(k, hi - lo + 1):
        m *= 2
    return sorted({int(round(v)) for v in np.linspace(lo, hi, m)})


# ------------------------------------------------------------------ paired sampling
@dataclass(frozen=True)
class Draw:
    """Per-sample gradient estimates ``[n, P]`` (and rewards) of one estimator."""

    name: str
    grad: torch.Tensor
    reward: torch.Tensor


def draw(chain, params, plans: Plan | Sequence[Plan], n: int, *, seed: int, chunk: int,
         baseline=None, name: str | None = None, pairing=None) -> Draw:
    """n samples in chunks of ``chunk``; with several plans (a stratified j distribution),
    chunk i uses ``plans[i % len(plans)]``. Every call with the same seed and chunk draws
    the same x_T and noise, so sample i of two estimators is paired (common random numbers).
    With ``pairing`` each sample is the mean of an antithetic group (G chain evaluations)."""
    plans = [plans] if isinstance(plans, Plan) else list(plans)
    if n % chunk or (n // chunk) % len(plans):
        raise ValueError(f"n={n} must be a multiple of chunk={chunk} x {len(plans)} strata")
    g = torch.Generator().manual_seed(seed)
    grads, rewards = [], []
    for i in range(n // chunk):
        s = draw_estimates(chain, plans[i % len(plans)], params, chunk, generator=g, chunk=chunk, baseline=baseline,
                           pairing=pairing)
        grads.append(s.grad)
        rewards.append(s.reward)
    label = name or (str(plans[0]) if len(plans) == 1 else f"{plans[0]}..")
    return Draw(label, torch.cat(grads), torch.cat(rewards))


# ------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class TraceVar:
    """tr Cov per sample with a normal-approximation 95% CI: the mean of
    y_i = |g_i - mean g|^2 n/(n-1), whose standard error is sd(y)/sqrt(n)."""

    value: float
    se: float
    n: int
    y: np.ndarray

    @property
    def lo(self) -> float:
        return self.value - Z95 * self.se

    @property
    def hi(self) -> float:
        return self.value + Z95 * self.se


def trace_var(samples: torch.Tensor) -> TraceVar:
    x = samples.double().numpy()
    n = x.shape[0]
    y = ((x - x.mean(0)) ** 2).sum(1) * n / (n - 1)
    return TraceVar(float(y.mean()), float(y.std(ddof=1) / np.sqrt(n)), n, y)


def ratio_ci(a: TraceVar, b: TraceVar, paired: bool) -> tuple[float, float, float]:
    """a/b with a 95% CI by the delta method on log(a/b); ``paired`` uses the covariance
    of y_a and y_b (common random numbers)."""
    r = a.value / b.value
    v = (a.se / a.value) ** 2 + (b.se / b.value) ** 2
    if paired:
        if a.n != b.n:
            raise ValueError("paired ratio needs equal sample sizes")
        v -= 2 * np.cov(a.y, b.y)[0, 1] / (a.n * a.value * b.value)
    s = float(np.sqrt(max(v, 0.0)))
    return r, r * np.exp(-Z95 * s), r * np.exp(Z95 * s)


def paired_diff(a: TraceVar, b: TraceVar) -> tuple[float, float]:
    """tr Var(a) - tr Var(b) from paired samples, and its standard error."""
    d = a.y - b.y
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


# ------------------------------------------------------------------ output
def fmt(x: float, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if x == 0:
        return "0"
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def write_table(out: Path, stem: str, header: Sequence[str], rows: Sequence[Sequence], preamble: str = "") -> Path:
    """Write ``stem``.csv (raw values) and ``stem``.md (formatted, with ``preamble``)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([[("" if v is None else v) for v in r] for r in rows])
    lines = [preamble.strip(), ""] if preamble else []
    cell = lambda v: (v if isinstance(v, str) else fmt(v)).replace("|", "\\|")  # noqa: E731
    lines += ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return out / f"{stem}.md"


def save_fig(fig, out: Path, stem: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    pyplot().close(fig)
    return path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (figures are only written to files); imported
    when a figure is drawn, so that :func:`require_extras` can report a missing ``plots`` extra."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: a module of each extra the experiments use, and the command that installs the extras
EXTRA_MODULES = {"plots": "matplotlib", "diffusion": "diffusers"}


def require_extras(*extras: str) -> None:
    """Exit with status 2 and the pip command that installs them, before any work is done,
    unless the named extras of halforder (``plots``, ``diffusion``) are installed."""
    missing = [e for e in extras if importlib.util.find_spec(EXTRA_MODULES[e]) is None]
    if missing:
        names = " and ".join(f"the {e} extra ({EXTRA_MODULES[e]})" for e in missing)
        print(f"{os.path.basename(sys.argv[0])}: error: needs {names}; install with: "
              f"pip install -e \".[{','.join(missing)}]\"", file=sys.stderr)
        raise SystemExit(2)


def cli(description: str, extras: Sequence[str] = ("plots",)) -> argparse.Namespace:
    """The experiments' command line (``--quick``, ``--out``); exits with status 2 at once
    unless ``extras`` are installed (:func:`require_extras`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sample sizes: a smoke test, not results")
    p.add_argument("--out", type=Path, help="output folder (default docs/results; with --quick, runs/quick-results, "
                                            "so that a smoke run never overwrites the committed results)")
    args = p.parse_args()
    require_extras(*extras)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    return args


def setup() -> None:
    """Deterministic, single-threaded torch (the machine is shared; the tensors are tiny)."""
    torch.set_num_threads(int(os.environ.get("HALFORDER_THREADS", "1")))
    torch.use_deterministic_algorithms(True)
