"""The solver contract (every solver is a Solver, its per-step numbers are pinned), and
DPM-Solver++(2M) on flow sigmas with a velocity prediction (SANA's sampler) against diffusers."""
import dataclasses

import pytest
import torch

from halforder.diffusion import DiffusionChain, rollout
from halforder.diffusion.sampling.solvers import (DDIMSolver, DPMSolver, FlowMatchSolver, LatentScale, Solver,
                                                  make_solver)

diffusers = pytest.importorskip("diffusers")

# SANA's scheduler: DPM-Solver++(2M) on flow sigmas shifted by 3, the network predicts the velocity
SANA = dict(algorithm_type="dpmsolver++", solver_order=2, prediction_type="flow_prediction", use_flow_sigmas=True,
            flow_shift=3.0)


def _sana(**kw):
    return diffusers.DPMSolverMultistepScheduler(**{**SANA, **kw})


def _set(sched, T, **kw):
    s = type(sched).from_config(sched.config, **kw)
    s.set_timesteps(T)
    return s


ETAS = {"ode": lambda T: [0.0] * T, "sde": lambda T: [1.0] * T,
        "mixed": lambda T: [float(i % 3 == 1) for i in range(T)]}


@pytest.mark.parametrize("etas", list(ETAS))
@pytest.mark.parametrize("T,final", [(1, "zero"), (2, "zero"), (6, "zero"), (16, "zero"), (6, "sigma_min"),
                                     (16, "sigma_min")])  # 16: order 2 up to the last step with sigma_min
def test_flow_dpm_steps_match_scheduler(T, final, etas):
    """eta = 1 is diffusers' sde-dpmsolver++ step on flow sigmas, eta = 0 its dpmsolver++ step;
    a mixed schedule switches between them with the multistep history carried over."""
    etas = ETAS[etas](T)
    sched = _sana(final_sigmas_type=final)
    solver = make_solver(sched, T).with_etas(etas)
    assert isinstance(solver, DPMSolver)
    ode, sde = _set(sched, T), _set(sched, T, algorithm_type="sde-dpmsolver++")
    assert torch.equal(solver.timesteps.flip(0), ode.timesteps)
    g = torch.Generator().manual_seed(T)
    x = torch.randn(2, 4, 4, 4, generator=g)
    state = solver.initial_state(x)
    for t in range(T, 0, -1):
        eps = torch.randn(x.shape, generator=g)
        v = 0.5 * x + torch.randn(x.shape, generator=g)       # a velocity prediction
        s, other = (sde, ode) if etas[t - 1] > 0 else (ode, sde)
        ref = s.step(v, s.timesteps[T - t], x, variance_noise=eps).prev_sample
        other.model_outputs, other.lower_order_nums, other._step_index = \
            list(s.model_outputs), s.lower_order_nums, s._step_index
        mean = solver.step(t, state, v)
        torch.testing.assert_close(mean[0] + solver.sigma(t) * eps, ref, rtol=1e-5, atol=1e-5)
        # the last step to sigma = 0 is noiseless
        assert (solver.sigma(t) > 0) == (etas[t - 1] > 0 and (t > 1 or final == "sigma_min"))
        x, state = ref, (ref, mean[1])


def test_flow_dpm_chain_rollout_matches_scheduler_loop():
    """A chain on the flow DPM solver, rolled out at eta = 1 with the step noise given, is the
    scheduler's sde-dpmsolver++ loop on the same velocity field."""
    T = 5
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) / 2

    def velocity(x, t, params):
        return torch.tanh(x @ w) - x

    solver = make_solver(_sana(algorithm_type="sde-dpmsolver++"), T)
    chain = DiffusionChain(velocity, solver, 0.0, lambda z: z.mean((1, 2, 3)), (3, 4, 4)).with_noise(1.0, 0.0)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 3, 4, 4, generator=g)
    noise = [torch.randn(x_T.shape, generator=g) for _ in range(T)]
    ref, x = _set(_sana(algorithm_type="sde-dpmsolver++"), T), x_T
    for i, ts in enumerate(ref.timesteps):
        x = ref.step(velocity(x, T - i, {}), ts, x, variance_noise=noise[i]).prev_sample
    torch.testing.assert_close(rollout(chain, {}, chain.initial_state(x_T), noise=noise), x, rtol=1e-5, atol=1e-5)


def test_every_solver_meets_the_contract():
    solvers = [make_solver(diffusers.DDIMScheduler(), 3), make_solver(_sana(), 3),
               make_solver(diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), 3),
               make_solver(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), 3)]
    for s in solvers:
        assert isinstance(s, Solver) and isinstance(s.with_etas(0.5), type(s))
        assert s.T == 3 and len(s.steps) == 3 and s.timesteps.shape == (3,)
        assert [s.with_etas(0.5).sigma(t) for t in (1, 2, 3)] == [k.sigma for k in s.with_etas(0.5).steps]


def test_the_table_matches_subclasses_and_refuses_the_rest():
    class MyDDIM(diffusers.DDIMScheduler):
        pass

    assert isinstance(make_solver(MyDDIM(), 2), DDIMSolver)
    with pytest.raises(ValueError, match="unsupported scheduler EulerDiscreteScheduler"):
        make_solver(diffusers.EulerDiscreteScheduler(), 2)
    with pytest.raises(ValueError, match="needs flow sigmas"):
        make_solver(_sana(use_flow_sigmas=False), 2)
    with pytest.raises(ValueError, match="unsupported prediction_type"):
        make_solver(diffusers.DDIMScheduler(prediction_type="flow_prediction"), 2)
    with pytest.raises(ValueError, match="apply to flow-matching models only"):
        make_solver(_sana(), 2, mu=0.5)


# The per-step numbers (DDIMStep, DPMStep, FlowStep as tuples), recorded before the steps had
# named fields: they must stay exactly these.
PINNED = {
    "ddim": [(0.9998999834060669, 1.0, 0.0, 0.0, 1.0),
             (0.07779665291309357, 1.4284999863607946, 0.01000078746765828, 2.9050986808368826e-05, 0.7)],
    "dpm": [(0.5644685570237196, 0.8254545706043185, 0.0, 1.0, 0.0, 1, 1.0),
            (0.10480566795518674, 0.9944927209208055, 0.7216631845144977, 0.4888341649320105, 0.4077965884053424, 2,
             1.5019242791859484),
            (0.0063528184294600835, 0.9999798206453979, 0.9945127895470421, 0.09848770877741854, 0.0, 1, 1.0)],
    "sde": [(0.008928571827709675, -0.008928571827709675, 0.7, 0.9977927926932341, -0.011116071925498544,
             0.006278090311090728),
            (1.0, -0.9910714030265808, 0.0, 1.0, -0.9910714030265808, 0.0)],
    "cps": [(0.008928571827709675, -0.008928571827709675, 0.0, 1.0, -0.008928571827709675, 0.0),
            (1.0, -0.9910714281722903, 0.7, 0.9951249149583127, -0.9910714281722903, 0.00795541575017378)],
}


def test_step_numbers_are_pinned():
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    solvers = {
        "ddim": make_solver(diffusers.DDIMScheduler(clip_sample=True), 2, [0.5, 1.0], LatentScale(1.0, 0.7, 400)),
        "dpm": make_solver(diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), 3,
                           [1.0, 0.5, 0.0]),
        "sde": make_solver(flow, 2, [0.7, 0.0]),
        "cps": make_solver(flow, 2, [0.0, 0.7], noise="cps"),
    }
    assert isinstance(solvers["sde"], FlowMatchSolver)
    for name, s in solvers.items():
        assert [dataclasses.astuple(k) for k in s.steps] == PINNED[name], name
