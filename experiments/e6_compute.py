"""Experiment 6: variance against compute — the honest efficiency comparison.

With a compute budget C (step evaluations), an estimator whose sample costs c averages
C/c samples, so its variance is tr Var * c / C: the product tr Var x c ranks estimators
at equal compute. Memory is a peak, not an amount spent per sample, so it is shown as a
Pareto front (variance against the number of step graphs kept at once). Costs come from
Plan.cost(); variances are those of experiment 2 (same samples).
"""
from __future__ import annotations


from halforder.estimators import Plan

from .common import ChainConfig, default_chain, pyplot, save_fig, write_table
from .e2_variance import measure, variance_plans


def run(out, quick: bool = False, measured: dict | None = None) -> dict:
    cfg = ChainConfig()
    chain, params = default_chain(cfg)
    n, chunk = (1024, 128) if quick else (65536, 8192)
    if measured is None:
        measured = measure(chain, params, variance_plans(cfg.T), n, chunk, desc="e6 variance")
    fo = measured["FO (full backprop)"][0].value
    fo_cost = Plan.full(cfg.T).cost()
    fo_work = fo * (fo_cost["forward"] + fo_cost["backward"])
    rows, pts = [], []
    for label, (tv, plan, _) in measured.items():
        c = (plan if isinstance(plan, Plan) else plan[0]).cost()
        work = c["forward"] + c["backward"]
        vw = tv.value * work
        rows.append([label, tv.n, tv.value, tv.lo, tv.hi, c["forward"], c["backward"], c["graph_steps"],
                     vw, tv.lo * work, tv.hi * work, vw / fo_work, tv.value * max(c["graph_steps"], 1)])
        pts.append((label, c["graph_steps"], work, tv))
    pre = (f"**Variance against compute** on the {cfg.describe()}. tr Var: per-sample trace of the covariance "
           f"(n = {pts[0][3].n} paired samples per row, 95% CI, as in experiment 2). Costs from `Plan.cost()` in "
           "units of one chain step: `fwd` step evaluations (rollout + HO recomputation), `bwd` steps "
           "backpropagated, `graph` step graphs kept at once. `Var x (fwd+bwd)` is the variance at equal compute "
           "(CI scaled likewise); `rel. to FO` divides by FO's value. `Var x max(graph,1)` is shown because the issue "
           "asks for it, but memory is a peak constraint, not a per-sample cost: see the Pareto plot.")
    write_table(out, "e6_compute", ["estimator", "n", "tr Var", "CI low", "CI high", "fwd", "bwd", "graph",
                                    "Var x (fwd+bwd)", "CI low ", "CI high ", "rel. to FO", "Var x max(graph,1)"],
                rows, pre)
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (label, graph, work, tv) in enumerate(pts):
        c = f"C{i % 10}"
        m = "o" if i < 10 else "s"
        ax1.errorbar(max(graph, 0.5), tv.value, yerr=[[tv.value - tv.lo], [tv.hi - tv.value]], fmt=m, color=c,
                     capsize=3, label=label)
        ax2.errorbar(work, tv.value * work, yerr=[[(tv.value - tv.lo) * work], [(tv.hi - tv.value) * work]], fmt=m,
                     color=c, capsize=3, label=label)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("graph memory: step graphs kept at once (0 plotted at 0.5)")
    ax1.set_ylabel("tr Cov of one per-sample estimate")
    ax1.set_title("Variance vs memory (lower left is better)")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("compute per sample: forward + backward step evaluations")
    ax2.set_ylabel("tr Var x (fwd + bwd) (variance at equal compute, x budget)")
    ax2.set_title("Variance x compute (lower is better)")
    ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_fig(fig, out, "e6_compute")
    return {"rows": rows}


if __name__ == "__main__":
    from .common import cli, setup

    args = cli(__doc__.splitlines()[0])
    setup()
    run(args.out, args.quick)
