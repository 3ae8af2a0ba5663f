"""Experiment 9: the estimators the field runs (DDPO, Flow-GRPO, DanceGRPO, MixGRPO, AlignProp,
DRaFT-K), their settings swept, measured for bias, variance and counted compute.

Three chains, each with batches of B = 48 samples (one training step's estimate):
- the linear-Gaussian chain (T = 8, d = 3, sigma_t = 0.5, tau = 0): exact grad J, and the exact
  gradient of J - beta KL(p_theta || p_ref) over paths (:func:`e9_measure.path_kl`), with the
  reference theta_ref = theta + 0.1 v (v a fixed random unit vector); its multi-prompt variant
  adds a prompt's reward level c_p ~ N(0, (2 sd R)^2) to R, P = B / G prompts of G consecutive
  samples, a fresh level per prompt and batch;
- the tanh chain (T = 8, d = 3, sigma_t = 0.3, tau = 0), against a full-backprop reference of
  2^20 samples;
- the tiny SD3 flow chain (T = 4, the SDE with a = 0.7 at every step, a rank-1 LoRA on
  ``proj_out``: its 16 B weights are theta, brightness reward), against full backprop on the
  same noise (the estimators' own samples, paired).

Every REINFORCE-like and truncated-backprop estimate is assembled from per-step terms computed
by the engine on common noise (:mod:`e9_measure`), and one batch of each is checked against the
engine's own estimate of its plan. The clipped surrogate (PPO's ratio, ``clip_range``) runs on
rollouts recorded under theta_old; its U-th update on a rollout is taken at the fixed displaced
theta_U = theta_old + (U - 1) lr u, u the unit vector along grad J(theta_old) (the reference's
mean on the nonlinear chains), lr set so that the per-step log-ratio has rms 0.01 at U = 2;
its truth is grad (J - beta KL)(theta_U). Per estimator: relative bias and cosine with the truth
(95% bootstrap intervals over batches), the resolution (the size a zero bias's estimate has),
Hotelling's p, the variance per sample (B x tr Cov of a batch mean, normal 95% interval), the
evaluations per sample counted by the compute meter, and their product.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from halforder.estimators import Plan, draw_estimates, flatten
from halforder.estimators.clipped_ratio import clipped_surrogate, record
from halforder.toy import linear_chain, reference_gradient, tanh_chain

from . import e9_measure as m
from .e9_report import write_outputs
from .e9_specs import B, BETAS, UPDATES, Spec, sd3_specs, specs

REF_OFFSET = 0.1
LOG_RATIO_RMS = 0.01


@dataclass
class Setup:
    """A chain as e9 measures it: ``batches`` rows in chunks of ``chunk`` batches, noise from
    ``seed``; ``truth(params, beta)`` the truth vector (None: full-backprop rows)."""

    name: str
    chain: object
    params: dict
    batches: int
    chunk: int
    seed: int
    truth: object
    offset_sd: float = 0.0
    reference: dict | None = None
    draws: int = 64
    n_ref: int = 0


def displaced(params, u: torch.Tensor, step: float) -> dict:
    """theta + step u (u flattened in the order of ``params``)."""
    out, i = {}, 0
    for k, v in params.items():
        out[k] = (v.detach().double() + step * u[i:i + v.numel()].view(v.shape)).to(v.dtype)
        i += v.numel()
    return out


def calibrate(chain, params, u, seed: int) -> float:
    """The step lr at which theta + lr u has per-step log-ratios of rms ``LOG_RATIO_RMS`` on a
    pilot rollout recorded under ``params`` (to first order in lr)."""
    g, trial = m.gen(seed), 1e-2
    rec = record(chain, Plan.reinforce(chain.T), params, chain.sample_start(256, g), generator=g)
    rms = (2 * clipped_surrogate(rec, displaced(params, u, trial)).stats["approx_kl"]) ** 0.5
    return trial * LOG_RATIO_RMS / rms


def measure(setup: Setup, spec_list: list[Spec]) -> tuple[list[dict], dict]:
    """Every spec's rows, summary and counted evaluations on ``setup``; and the run's checks."""
    chain, params, T, s0 = setup.chain, setup.params, setup.chain.T, setup.seed
    ref_rows = None
    if setup.truth is None:                      # u from a full-backprop pilot
        pilot = draw_estimates(chain, Plan.full(T), params, 256, generator=m.gen(s0 + 97000), chunk=256)
        t0 = pilot.grad.mean(0).double()
    else:
        t0 = setup.truth(params, 0.0)[0]
    u = t0 / t0.norm()
    lr = calibrate(chain, params, u, s0 + 96000)
    at = {U: displaced(params, u, (U - 1) * lr) for U in range(1, max(UPDATES) + 1)}
    samplers = [s.sampler(T) for s in spec_list]
    states = [s.init() for s in samplers]
    plan_gens = [m.gen(s0 + 100000 + i) for i in range(len(spec_list))]
    rows = {i: [] for i in range(len(spec_list))}
    stats = {i: [] for i in range(len(spec_list))}
    same_at_u1, n_chunks, step_sum = None, setup.batches // setup.chunk, 0.0
    for c in tqdm(range(n_chunks), desc=f"e9 {setup.name}", leave=False):
        N = setup.chunk * B
        x_T = chain.sample_start(N, m.gen(s0 + 2 * c))
        terms = m.step_terms(chain, params, x_T, s0 + 2 * c + 1)
        step_sum = step_sum + terms.path.sum(0)
        if setup.truth is None:
            ref_rows = (ref_rows or []) + [terms.path.sum(1).reshape(setup.chunk, B, -1).mean(1)]
        offsets = {G: m.prompt_offsets(setup.chunk, B, G, setup.offset_sd, m.gen(s0 + 50000 + 1000 * G + c))
                   for G in sorted({s.G for s in spec_list if s.prompts and s.G})}
        recorded = {}
        for i, spec in enumerate(spec_list):
            cvec = offsets[spec.G] if spec.prompts and spec.G else torch.zeros(N, dtype=torch.float64)
            adv = m.PerBatch(spec.advantage, B)
            if not spec.clipped:
                plans = []
                for _ in range(setup.chunk):
                    plans.append(samplers[i].sample(states[i], plan_gens[i]))
                    states[i] = samplers[i].update(states[i], plans[-1], None)
                W = torch.tensor([m.step_weights(p) for p in plans], dtype=torch.float64)
                path = m.path_kind(plans[0])
                rows[i].append(m.assemble(terms, W, path, None if path else adv(terms.reward + cvec)))
                continue
            plan = samplers[i].sample(states[i], plan_gens[i])
            key = (plan, spec.advantage, spec.prompts and spec.G)
            if key not in recorded:
                recorded[key] = m.record_with(chain, plan, params, x_T, s0 + 2 * c + 1, adv, cvec)
            r, st = m.surrogate_rows(recorded[key], at[spec.U], B, clip_range=spec.clip, kl_beta=spec.beta,
                                     reference=setup.reference)
            rows[i].append(r)
            stats[i].append(st)
            if spec.U == 1 and not spec.beta:
                W = torch.tensor([m.step_weights(plan)] * setup.chunk, dtype=torch.float64)
                on_policy = m.assemble(terms, W, False, adv(terms.reward + cvec))
                same_at_u1 = max(same_at_u1 or 0.0, float((r - on_policy).abs().max() / on_policy.abs().max()))
    share = (step_sum.norm(dim=1) / step_sum.sum(0).norm()).tolist()    # |mean p_t| / |mean sum_t p_t|
    checks = {"same_at_u1": same_at_u1, "lr": lr, "engine": engine_checks(setup, spec_list), "share": share}
    results = summarise(setup, spec_list, rows, stats, ref_rows, at)
    return results, checks


def engine_checks(setup: Setup, spec_list: list[Spec]) -> float:
    """The largest relative difference over the specs (not clipped) between one batch assembled
    from step terms and the engine's estimate of the same plan on the same noise."""
    chain, params, s = setup.chain, setup.params, setup.seed + 90000
    x_T = chain.sample_start(B, m.gen(s))
    terms = m.step_terms(chain, params, x_T, s + 1)
    worst = 0.0
    for i, spec in enumerate(spec_list):
        if spec.clipped:
            continue
        plan = spec.sampler(chain.T).sample(spec.sampler(chain.T).init(), m.gen(s + 2 + i))
        c = m.prompt_offsets(1, B, spec.G, setup.offset_sd, m.gen(s + 500 + i)) if spec.prompts and spec.G \
            else torch.zeros(B, dtype=torch.float64)
        worst = max(worst, m.engine_check(chain, plan, params, x_T, s + 1, terms, spec.advantage, c))
    return worst


def summarise(setup, spec_list, rows, stats, ref_rows, at) -> list[dict]:
    """A result dict per spec (module docstring's measures)."""
    chain, T, s0 = setup.chain, setup.chain.T, setup.seed
    paired = torch.cat(ref_rows) if ref_rows is not None else None
    refs, cost, out = {}, {}, []
    for i, spec in enumerate(tqdm(spec_list, desc=f"e9 {setup.name}: summaries", leave=False)):
        x = torch.cat(rows[i])
        if setup.truth is not None:
            truth, var = setup.truth(at[spec.U], spec.beta)
            summ = m.summarise(x, B, truth=truth, truth_var=var)
        elif spec.U == 1:
            summ = m.summarise(x, B, ref=paired, paired=True)
        else:
            if spec.U not in refs:
                refs[spec.U] = draw_estimates(chain, Plan.full(T), at[spec.U], setup.n_ref,
                                              generator=m.gen(s0 + 80000 + spec.U), chunk=min(setup.n_ref, 8 * B)).grad
            summ = m.summarise(x, B, ref=refs[spec.U])
        sampler = spec.sampler(T)
        key = (spec.family, spec.settings, spec.clipped and (spec.U, spec.beta > 0))
        if key not in cost:
            if spec.clipped:
                plan = sampler.sample(sampler.init(), None)
                cost[key] = m.surrogate_evaluations(chain, plan, setup.params, [at[u] for u in range(1, spec.U + 1)],
                                                    4, s0 + 95000, clip_range=spec.clip, kl_beta=spec.beta,
                                                    reference=setup.reference)
            else:
                cost[key] = m.evaluations(chain, sampler, setup.params, 4, setup.draws, s0 + 95000)
        st = {k: sum(d[k] for d in stats[i]) / len(stats[i]) for k in stats[i][0]} if stats[i] else {}
        out.append(dict(chain=setup.name, spec=spec, summary=summ, evals=cost[key], n_rows=x.shape[0],
                        clip_fraction=st.get("clip_fraction"), approx_kl=st.get("approx_kl"),
                        unbiased=sampler.unbiased, plan_seed=s0 + 100000 + i))
    return out


def linear_setup(quick: bool) -> Setup:
    """The linear-Gaussian chain (module docstring), its exact truth and the prompts' reward spread."""
    chain, params = linear_chain(T=8, d=3, sigma=0.5, tau=0.0, seed=0)
    v = torch.randn(12, generator=m.gen(5), dtype=torch.float64)
    reference = displaced(params, v / v.norm(), REF_OFFSET)
    R = m.step_terms(chain, params, chain.sample_start(4096, m.gen(7)), 8).reward

    def truth(p, beta):
        g = flatten(chain.exact_grad(p))
        return (g - beta * m.kl_gradients(chain, p, reference)[0] if beta else g), None

    return Setup("linear", chain, params, 64 if quick else 8192, 32 if quick else 128, 1000, truth,
                 offset_sd=2 * float(R.std()), reference=reference,
                 draws=8 if quick else 64)


def tanh_setup(quick: bool) -> Setup:
    """The tanh chain, its truth a full-backprop reference at each parameter point asked for."""
    chain, params = tanh_chain(T=8, d=3, sigma=0.3, tau=0.0, seed=0)
    n_ref = 2 ** 14 if quick else 2 ** 20
    cache = {}

    def truth(p, beta):
        key = flatten(p).numpy().tobytes()
        if key not in cache:
            mean, se = reference_gradient(chain, p, n_ref, generator=m.gen(2000 + 80000 + len(cache)))
            cache[key] = (mean, se ** 2)
        return cache[key]

    return Setup("tanh", chain, params, 64 if quick else 8192, 32 if quick else 128, 2000, truth,
                 draws=8 if quick else 64, n_ref=n_ref)


def sd3_setup(quick: bool) -> Setup:
    """The tiny SD3 flow chain with 16 LoRA weights; its truth comes from full backprop rows."""
    from halforder.diffusion import NoiseScales, add_lora, make_chain, make_reward, tiny_model

    comp = tiny_model("tiny-sd3")
    lora = add_lora(comp.unet, rank=1, target_modules=["proj_out"], init=False, seed=0)
    params = {k: v.detach() for k, v in lora.items() if ".lora_B." in k}
    chain = make_chain(comp, 4, ["a photo"], make_reward("brightness"), guidance_scale=1.0).for_plan(
        Plan.reinforce(4), NoiseScales(eta_plan=0.7))
    return Setup("tiny SD3", chain, params, 4 if quick else 768, 2 if quick else 8, 3000, None,
                 draws=1 if quick else 8, n_ref=96 if quick else 8192)


def run(out, quick: bool = False) -> dict:
    """Measure every chain's estimators and write e9's tables and figure into ``out``."""
    t_start = time.perf_counter()
    results, checks, setups = [], {}, {}
    for make, chooser in ((linear_setup, lambda T: specs(T, True)), (tanh_setup, lambda T: specs(T, False)),
                          (sd3_setup, lambda T: sd3_specs(T, quick))):
        t = time.perf_counter()
        setup = make(quick)
        spec_list = chooser(setup.chain.T)
        if quick and setup.name != "tiny SD3":
            spec_list = [s for s in spec_list if s.sweep in ("recipe", "kl") or s.label == "per-prompt LOO"]
        r, checks[setup.name] = measure(setup, spec_list)
        checks[setup.name]["seconds"] = time.perf_counter() - t
        results += r
        setups[setup.name] = setup
    kl_rows = kl_table(setups["linear"])
    write_outputs(out, results, checks, setups, kl_rows, time.perf_counter() - t_start, quick)
    return {"checks": checks, "seconds": time.perf_counter() - t_start}


def kl_table(setup: Setup) -> list[list]:
    """The exact path-KL gradient against its direct part (the law of x_t held fixed, what the
    field's estimate takes) on the linear chain, at theta_old and displaced, for two offsets."""
    chain, params = setup.chain, setup.params
    u = flatten(chain.exact_grad(params))
    u = u / u.norm()
    v = torch.randn(12, generator=m.gen(5), dtype=torch.float64)
    rows = []
    for offset in (REF_OFFSET, 3 * REF_OFFSET):
        ref = displaced(params, v / v.norm(), offset)
        for step in (0.0, 0.02, 0.06):
            p = displaced(params, u, step)
            total, direct = m.kl_gradients(chain, p, ref)
            gJ = flatten(chain.exact_grad(p))
            row = [offset, step, float(m.path_kl(chain, p, ref)), float(total.norm()),
                   float((direct - total).norm() / total.norm()),
                   float(direct @ total / (direct.norm() * total.norm()))]
            for beta in BETAS[1:]:
                row.append(float(beta * (direct - total).norm() / (gJ - beta * total).norm()))
            rows.append(row)
    return rows


if __name__ == "__main__":
    from .common import cli, setup as setup_torch

    args = cli(__doc__.splitlines()[0], ("plots", "diffusion"))
    setup_torch()
    print(run(args.out, args.quick))
