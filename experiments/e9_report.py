"""e9's tables (Markdown with one section per chain and sweep, and one CSV) and figure."""
from __future__ import annotations

import csv
from pathlib import Path


from .common import fmt, pyplot, save_fig, write_table

SWEEPS = {"recipe": "The field's recipes, and halforder's unbiased forms",
          "group": "Group size G and advantage (one prompt)",
          "prompts": "Group size G and advantage, prompts with different reward levels",
          "fraction": "Step fraction (a random subset of the steps, drawn once per update)",
          "window": "Windows of steps (sliding: E g over a whole cycle of positions; one update trains only its "
                     "window)",
          "clip": "Clip range x updates per rollout U (REINFORCE on every step, batch LOO)",
          "kl": "KL penalty beta (no clipping, batch LOO)"}
HEADER = ["chain", "sweep", "estimator", "flags", "G", "plan law unbiased", "bias", "bias lo", "bias hi", "cos",
          "cos lo", "cos hi", "scale", "resolution", "Hotelling p", "var/sample", "var lo", "var hi", "evals/sample",
          "var x evals", "var/|E g|^2", "clip fraction", "approx_kl", "batches", "plan seed"]


def values(r: dict) -> list:
    """A result's CSV row (:data:`HEADER`)."""
    s, sp = r["summary"], r["spec"]
    return [r["chain"], sp.sweep, sp.label, sp.flags(), sp.G, r["unbiased"], s.bias, *s.bias_ci, s.cos, *s.cos_ci,
            s.scale, s.resolution, s.pvalue, s.var, *s.var_ci, r["evals"], s.var * r["evals"], s.var / s.mean_norm ** 2,
            r["clip_fraction"], r["approx_kl"], r["n_rows"], r["plan_seed"]]


def _ci(v, lo, hi) -> str:
    return f"{fmt(v, 3)} [{fmt(lo, 3)}, {fmt(hi, 3)}]".replace("-0 ", "0 ").replace("[-0,", "[0,")


def section(rows: list[dict], flags: bool) -> list[str]:
    """One Markdown table of results."""
    head = ["estimator", "G", "bias [95%]", "1 - cos [95%]", "scale", "resol.", "p", "var/sample", "evals/sample",
            "var x evals", "var/\\|E g\\|^2"]
    clipped = any(r["clip_fraction"] is not None for r in rows)
    head += ["clip frac."] if clipped else []
    head += ["flags"] if flags else []
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s, sp = r["summary"], r["spec"]
        cells = [sp.label, "—" if sp.G is None else str(sp.G), _ci(s.bias, *s.bias_ci), _ci(1 - s.cos, 1 - s.cos_ci[1], 1 - s.cos_ci[0]),
                 fmt(s.scale, 3), fmt(s.resolution, 3), "—" if s.pvalue is None else fmt(s.pvalue, 2), fmt(s.var, 3),
                 fmt(r["evals"], 3), fmt(s.var * r["evals"], 3), fmt(s.var / s.mean_norm ** 2, 3)]
        cells += ["—" if r["clip_fraction"] is None else fmt(r["clip_fraction"], 3)] if clipped else []
        cells += [f"`{sp.flags()}`"] if flags else []
        out.append("| " + " | ".join(cells) + " |")
    return out


def _checks(checks: dict, key: str) -> str:
    return ", ".join(f"{k} {'—' if v[key] is None else f'{v[key]:.1e}'}" for k, v in checks.items())


def preamble(checks: dict, setups: dict, seconds: float, quick: bool) -> str:
    """The Markdown's opening: what is measured, on which chains, the run's checks and seeds."""
    lin = setups["linear"]
    lines = [
        "# e9: the field's estimators, measured",
        "",
        "Written by `python -m experiments.e9_field_estimators`" + (" --quick (tiny samples: not results)." if quick
                                                                     else "."),
        f"Wall time {seconds:.0f} s on a shared 2-core machine, one torch thread ("
        + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in checks.items()) + ").",
        "",
        "**What is measured.** Each row is one estimator, run as a training step runs it: batches of B = 48 samples, "
        "its plan drawn once per batch (update), its advantage taken within the batch; the rows are i.i.d. batch "
        "means. `bias` = |E g - truth| / |truth|, estimated as sqrt(|b|^2 - tr C) / |truth| with b = mean g - truth "
        "and C its covariance (the plain |b| is biased upwards by noise), with a normal 95% interval on |E g - "
        "truth|^2 (variance 4 b^T C b + 2 tr C^2) carried over by the square root and clipped at 0; `cos` = "
        "cos(E g, truth) with the same correction, delta-method normal 95% interval (the tables show 1 - cos); `scale` = |E g| / |truth| "
        "(GRPO's normalisation and unweighted subsets rescale E g: `bias` counts that, `cos` does not); `resol.` = "
        "sqrt(tr C) / |truth|, the size of the noise in b. `p`: Hotelling's test of E g = truth (paired on tiny "
        "SD3 at U = 1, two-sample against the independent reference at U > 1). `var/sample` = B x tr Cov of a "
        "batch mean (normal interval in the CSV); `evals/sample`: model evaluations (forward + backward) per sample "
        "of one update, counted by the compute meter on the engine's own calls (for U updates per rollout: the "
        "rollout and U surrogate passes, divided by U); `var/|E g|^2` = var/sample / |E g|^2, scale-free.",
        "",
        f"**Chains.** Linear-Gaussian T = 8, d = 3, sigma_t = 0.5, tau = 0 (seed 0): truth exact; the KL rows' "
        f"truth is grad (J - beta KL_path), reference theta + 0.1 v (v a fixed random unit vector, seed 5). "
        f"Multi-prompt variant: R + c_p, c_p ~ N(0, {lin.offset_sd:.3g}^2) (2 sd R), P = 48 / G prompts. Tanh T = 8, "
        f"d = 3, sigma_t = 0.3 (seed 0): truth a full-backprop mean of {setups['tanh'].n_ref} samples (its standard "
        "errors in C). Tiny SD3 T = 4 (the SDE with a = 0.7 at every step, rank-1 LoRA B of proj_out: 16 weights, "
        "brightness reward): truth full backprop on the same samples (paired); U > 1 against "
        f"{setups['tiny SD3'].n_ref} independent full-backprop samples at theta_U. The U-th update on a rollout is "
        "taken at theta_U = theta_old + (U - 1) lr u, u along grad J (the reference's mean on tanh, a 256-sample "
        "full-backprop pilot on tiny SD3), lr such that the per-step log-ratio has rms 0.01 at U = 2 on a pilot "
        "rollout (lr: " + ", ".join(f"{k} {v['lr']:.3g}" for k, v in checks.items()) + ").",
        "",
        "**Where grad J lies.** |E p_t| / |grad J| for t = 1..T, p_t the pathwise term of step t (t = 1 produces "
        "x_0): " + "; ".join(f"{k} " + ", ".join(f"{v:.2g}" for v in c["share"]) for k, c in checks.items())
        + ". On the toy chains step 1 carries most of grad J; on tiny SD3 steps 2-4 do.",
        "",
        "**Checks made by the run.** One batch of every estimator without a clipped ratio was recomputed by the "
        "engine from its plan, advantage and reward on the same noise; largest relative difference: "
        + _checks(checks, "engine") + ". The clipped surrogate at U = 1 against REINFORCE on the same noise: "
        + _checks(checks, "same_at_u1") + ".",
        "",
        "**Seeds** (the chain's seed s: linear 1000, tanh 2000, tiny SD3 3000). Chunk c of batches: x_T from "
        "s + 2c, the steps' noise from s + 2c + 1; prompt levels s + 50000 + 1000 G + c; row i's plan draws "
        "s + 100000 + i; the reward spread of the prompts from 4096 rollouts (seeds 7 and 8); the engine check s + 90000; the lr pilot s + 96000; metering s + 95000; tanh reference "
        "82000 + k (k-th parameter point); tiny SD3 direction pilot s + 97000, U > 1 reference s + 80000 + U.",
    ]
    return "\n".join(lines)


def write_outputs(out: Path, results: list[dict], checks: dict, setups: dict, kl_rows: list, seconds: float,
                  quick: bool) -> None:
    """docs/results/e9_field_estimators.{md,csv,png} and e9_field_kl.{md,csv}."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "e9_field_estimators.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows([["" if v is None else v for v in values(r)] for r in results])
    md = [preamble(checks, setups, seconds, quick), ""]
    for sweep, title in SWEEPS.items():
        for chain in setups:
            rows = [r for r in results if r["chain"] == chain and r["spec"].sweep == sweep]
            if rows:
                md += [f"## {title}: {chain}", ""] + section(rows, sweep == "recipe") + [""]
    (out / "e9_field_estimators.md").write_text("\n".join(md))
    write_table(out, "e9_field_kl", ["ref offset", "step along grad J", "KL_path", "|grad KL_path|",
                                     "direct part: relative error", "direct part: cos",
                                     "bias of grad(J - 0.01 KL)", "bias of grad(J - 0.04 KL)"], kl_rows,
                "**The field's KL gradient against the path KL's, exactly** (linear chain, T = 8). The field "
                "differentiates sum_t |mu_theta(x_t) - mu_ref(x_t)|^2 / (2 sigma_t^2) at states drawn from the "
                "current model, i.e. the path KL's gradient with the law of x_t held fixed (its direct part). "
                "Columns: the reference's offset |theta_ref - theta_old|, the parameters' displacement from "
                "theta_old along grad J, the path KL, its gradient's norm, the direct part's relative error and "
                "cosine against it, and the bias that error puts on the gradient of J - beta KL, relative to it.")
    figure(out, results, setups)


def _point(value: float, lo: float, hi: float, unresolved: bool, floor: float) -> tuple[float, bool]:
    """Where to draw a measure that should be small: the value, or, where its interval reaches
    the ideal (``unresolved``), the interval's far end as an upper bound."""
    return (max(hi, floor), True) if unresolved else (max(value, floor), False)


def figure(out: Path, results: list[dict], setups: dict) -> None:
    """Per chain: bias against variance x evaluations (top), 1 - cos against the scale-free
    variance x evaluations (bottom); open triangles are upper bounds (the 95% interval reaches
    the ideal)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(setups), figsize=(6 * len(setups), 10), squeeze=False)
    colors = dict(zip(SWEEPS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for j, chain in enumerate(setups):
        for sweep in SWEEPS:
            for r in (r for r in results if r["chain"] == chain and r["spec"].sweep == sweep):
                s = r["summary"]
                x0, x1 = s.var * r["evals"], s.var / s.mean_norm ** 2 * r["evals"]
                y0 = _point(s.bias, *s.bias_ci, s.bias_ci[0] == 0, 1e-4)
                y1 = _point(1 - s.cos, 1 - s.cos_ci[1], 1 - s.cos_ci[0], s.cos_ci[1] >= 1, 1e-7)
                for ax, x, (y, bound) in ((axes[0, j], x0, y0), (axes[1, j], x1, y1)):
                    ax.scatter(x, y, marker="v" if bound else ("*" if sweep == "recipe" else "o"),
                               s=50 if sweep == "recipe" else 16, facecolors="none" if bound else colors[sweep],
                               edgecolors=colors[sweep], zorder=3 if sweep == "recipe" else 2)
                    if sweep == "recipe":
                        ax.annotate(r["spec"].label.replace("halforder: ", "h: "), (x, y), fontsize=6,
                                    xytext=(3, 2), textcoords="offset points")
        for sweep in SWEEPS:
            if any(r["chain"] == chain and r["spec"].sweep == sweep for r in results):
                axes[0, j].scatter([], [], color=colors[sweep], label=sweep, marker="*" if sweep == "recipe" else "o")
        axes[0, j].set(xscale="log", yscale="log", title=f"{chain}: bias against variance x evaluations",
                       xlabel="variance per sample x evaluations per sample", ylabel="|E g - truth| / |truth|")
        axes[1, j].set(xscale="log", yscale="log", title=f"{chain}: scale-free",
                       xlabel="variance / |E g|^2 x evaluations per sample", ylabel="1 - cos(E g, truth)")
        axes[0, j].legend(fontsize=7, title="open triangles: upper bounds", title_fontsize=7)
    save_fig(fig, out, "e9_field_estimators")
