"""The learning-rate schedule: warmup starts at its first non-zero rate, the rest is diffusers',
every rate is a function of the update index (so a resume recomputes it exactly), and a warmup
as long as the run is refused."""
import pytest
import torch

pytest.importorskip("diffusers")

from halforder.training.config import ConfigError, LoopConfig  # noqa: E402
from halforder.training.schedules import LR_SCHEDULES, lr_schedule  # noqa: E402


def _rates(name, warmup, steps, start=0):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if start:
        opt.param_groups[0]["initial_lr"] = 1.0            # as a resumed optimiser's state holds it
    schedule, rates = lr_schedule(name, opt, warmup, steps, start), []
    for _ in range(start, steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return rates


@pytest.mark.parametrize("name", LR_SCHEDULES)
def test_warmup_starts_above_zero_and_resumes_exactly(name):
    rates = _rates(name, warmup=3, steps=8)
    assert rates[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and min(rates) > 0
    if name == "constant":
        assert rates[3:] == [1.0] * 5
    else:
        assert rates[3] == 1.0 and all(a > b for a, b in zip(rates[3:], rates[4:]))   # decays from update 4 on
    for start in range(1, 8):
        assert _rates(name, 3, 8, start) == rates[start:]                            # bit for bit
    assert _rates(name, 0, 8)[0] == 1.0


def test_a_warmup_as_long_as_the_run_is_refused():
    LoopConfig(steps=6, lr_warmup_steps=5)
    for warmup in (6, 100):
        with pytest.raises(ConfigError, match=f"lr_warmup_steps={warmup} is not shorter than the run"):
            LoopConfig(steps=6, lr_warmup_steps=warmup)
