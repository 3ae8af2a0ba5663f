"""Checkpointing that the meter sees: the same estimates, recomputation counted, steps chosen."""
import pytest
import torch

from halforder.estimators import Checkpointed, Plan, SavedTensorMeter, estimate
from halforder.estimators.gradient_checkpointing import checkpoint
from halforder.toy import tanh_chain


def _mlp(x, w1, w2):
    return torch.tanh(torch.tanh(x @ w1) @ w2)


def test_checkpoint_gives_the_gradient_and_the_meter_sees_the_recomputation():
    """Forward keeps only the inputs; backward recomputes the graph under the meter's hooks,
    so the peak is the plain graph's and the gradients are equal."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    w1, w2 = (torch.randn(32, 32, generator=g).requires_grad_() for _ in range(2))
    with SavedTensorMeter(exclude=[w1, w2]) as plain:
        ref = torch.autograd.grad(_mlp(x, w1, w2).square().sum(), [w1, w2])
    with SavedTensorMeter(exclude=[w1, w2]) as ckpt:
        out = checkpoint(_mlp, x, w1, w2)
        after_forward = ckpt.live
        got = torch.autograd.grad(out.square().sum(), [w1, w2])
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    assert after_forward < plain.peak / 2          # the graph is not kept ...
    assert ckpt.peak >= plain.peak                  # ... but its recomputation is counted


def test_checkpoint_passes_tuples_and_other_arguments_and_refuses_trainable_modules():
    w = torch.randn(3, 3, requires_grad=True)
    pair = checkpoint(lambda xs, k, w_: (xs[0] @ w_ * k, None, xs[1]), (torch.ones(2, 3), torch.zeros(1)), 2.0, w)
    assert pair[1] is None and pair[2].shape == (1,)
    (gw,) = torch.autograd.grad(pair[0].sum(), [w])
    torch.testing.assert_close(gw, 2 * torch.ones(2, 3).T @ torch.ones(2, 3))
    with pytest.raises(ValueError, match="need gradients"):
        checkpoint(torch.nn.Linear(3, 3), torch.ones(1, 3))


@pytest.mark.parametrize("plan", [Plan.full(6), Plan.rlr(6, 2, 3), Plan.reinforce(6)])
def test_checkpointed_steps_leave_the_estimate_unchanged(plan):
    chain, params = tanh_chain(T=6, d=16, seed=0)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    x_T = chain.sample_start(8, g())
    plain = estimate(chain, plan, params, x_T, generator=g())
    for c in (Checkpointed(chain), Checkpointed(chain, steps={1, 2})):
        est = estimate(c, plan, params, x_T, generator=g())
        for k in params:
            torch.testing.assert_close(est.grad[k], plain.grad[k], rtol=1e-12, atol=1e-14)


def test_checkpointed_full_backprop_keeps_one_step_graph_and_the_states():
    """Full backprop through T checkpointed steps: peak <= the larger of one step's graph and
    the reward's graph, plus T + 1 states; the plain chain keeps all T step graphs."""
    T, n = 6, 8
    chain, params = tanh_chain(T=T, d=16, tau=0.0, seed=0)
    x_T = chain.sample_start(n, torch.Generator().manual_seed(1))
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    with SavedTensorMeter(exclude=params.values()) as step, torch.enable_grad():
        x0 = chain.step(3, x_T, leaves)
    with SavedTensorMeter(exclude=params.values()) as reward, torch.enable_grad():
        chain.reward(x0)
    bound = max(step.peak, reward.peak) + (T + 1) * x_T.numel() * x_T.element_size()
    peaks = {}
    for name, c in (("plain", chain), ("ckpt", Checkpointed(chain))):
        with SavedTensorMeter(exclude=params.values()) as m:
            estimate(c, Plan.full(T), params, x_T, generator=torch.Generator().manual_seed(2))
        peaks[name] = m.peak
    assert peaks["ckpt"] <= bound < peaks["plain"]


def test_checkpointed_rejects_steps_outside_the_chain():
    with pytest.raises(ValueError, match="outside 1..6"):
        Checkpointed(tanh_chain(T=6, d=4, seed=0)[0], steps=[0, 7])


def test_checkpoint_keeps_nothing_alive_after_its_output_is_dropped():
    """The region holds its inputs only through the output's graph: dropping the output frees
    them without waiting for the garbage collector (no reference cycle)."""
    import gc
    import weakref

    gc.disable()
    try:
        w = torch.randn(3, 3, requires_grad=True)
        x = torch.randn(2, 3)
        out = checkpoint(lambda a, b: (a @ b, None), x, w)
        refs = [weakref.ref(out[0]), weakref.ref(out[0].grad_fn)]
        del out
        assert all(r() is None for r in refs)
    finally:
        gc.enable()
