"""Rewards with no gradient: DDPO's JPEG compressibility, and the refusal of plans that would
backpropagate through such a reward, by the command line (exit 2, one line) and by the
library's task (``ValueError``); and RLR's parts that need no reward gradient (``rlr_no_fo``)."""
import io

import pytest
import torch

from halforder.diffusion.rewards import REWARDS, differentiable, make_reward
from halforder.estimators import FAMILIES, Plan, Role, make_sampler

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion import DiffusionTask, ImageView, add_lora  # noqa: E402
from halforder.diffusion.app.cli import main  # noqa: E402
from halforder.diffusion.models.families import FAMILIES as MODELS  # noqa: E402


def test_jpeg_compressibility_is_ddpos_file_size():
    from PIL import Image

    reward = make_reward("jpeg_compressibility")
    assert REWARDS["jpeg_compressibility"].differentiable is False and not differentiable("jpeg_compressibility")
    g = torch.Generator().manual_seed(0)
    images = torch.cat([torch.full((1, 3, 32, 32), 0.5), torch.rand((1, 3, 32, 32), generator=g)])
    r = reward(images, ["", ""])
    for image, value in zip(images, r):   # -kB of the 8-bit image saved by Pillow at quality 95
        buffer = io.BytesIO()
        pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        assert float(value) == pytest.approx(-buffer.tell() / 1000)
    assert r[0] > r[1]                     # a flat image compresses better than noise
    assert not r.requires_grad
    with pytest.raises(ValueError, match="quality"):
        make_reward("jpeg_compressibility", quality=0)


def test_the_command_line_refuses_a_plan_with_first_order_steps(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--preset", "tiny", "--reward", "jpeg_compressibility", "--estimator", "full",
                 "--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("halforder train: error: the reward 'jpeg_compressibility' has no gradient"), err
    assert err.count("\n") == 1 and "rlr_no_fo" in err and not out.exists()


def test_the_task_refuses_a_plan_with_first_order_steps():
    c = MODELS["sd3"].tiny(0)
    params = add_lora(c.transformer, rank=2, seed=0)
    task = DiffusionTask(c, params, make_reward("jpeg_compressibility"), ImageView(c.vae, (4, 8, 8)), 4,
                         guidance_scale=1.0)
    for plan in (Plan.full(4), Plan.rlr(4, 2, 2), Plan.truncated(4, 1)):
        with pytest.raises(ValueError, match="the reward has no gradient") as e:
            task.chain(plan, ["a"])
        assert "\n" not in str(e.value)
    for plan in (Plan.reinforce(4), Plan.zeroth_order(4), Plan.from_roles(["ZO", "HO", "HO", "ZO"])):
        task.chain(plan, ["a"])            # built: no first-order step


def test_rlr_without_first_order_steps():
    assert not FAMILIES["rlr_no_fo"].reward_gradient and FAMILIES["rlr"].reward_gradient
    sampler = make_sampler("rlr_no_fo", 6, h=2)
    g = torch.Generator().manual_seed(0)
    plans = [sampler.sample(sampler.init(), g) for _ in range(40)]
    starts = {p.blocks[0][0] for p in plans}
    assert starts == set(range(2, 6))      # RLR's uniform j, its block unchanged
    for p in plans:
        j, h = p.blocks[0]
        assert p.fo_steps == 0 and p.roles[0] is Role.ZO and p.is_unbiased
        assert p.roles == tuple(Role.HO if j <= t < j + h else Role.ZO for t in range(1, 7))
    assert sampler.unbiased
