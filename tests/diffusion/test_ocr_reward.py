"""The OCR reward (Flow-GRPO's text-rendering reward): its score, RapidOCR reading rendered text,
and the refusal of plans that would backpropagate through a reward without a gradient."""
import pytest
import torch

from halforder.diffusion.rewards.ocr import OCR_EXTRA, quoted_text
from halforder.diffusion.rewards import REWARDS, differentiable, make_reward

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion.app.cli import main  # noqa: E402
from halforder.diffusion.app.config import load_config  # noqa: E402


def test_the_target_is_the_quoted_text():
    assert quoted_text('a neon sign that says "Open Late" at night') == "Open Late"
    assert quoted_text('"a" and "b"') == "a"
    for prompt in ("a sign with no text", 'a sign that says ""', 'an open "quote'):
        with pytest.raises(ValueError, match="quotes none"):
            quoted_text(prompt)


def test_the_ocr_reward_says_it_has_no_gradient():
    assert REWARDS["ocr"].differentiable is False
    assert not differentiable("ocr") and not differentiable("brightness+0.5*ocr")
    assert differentiable("brightness") and differentiable("aesthetic") and differentiable("brightness+0.5*temporal")


def test_flow_grpos_score():
    pytest.importorskip("rapidfuzz", reason="the ocr extra is not installed")
    from halforder.diffusion.rewards.ocr import ocr_score

    assert ocr_score("Hello World", "hello world") == 1.0            # spaces and case do not count
    assert ocr_score("OPEN 24h: hello world!", "hello world") == 1.0  # the target found inside
    assert ocr_score("helo world", "hello world") == pytest.approx(1 - 1 / 10)
    assert ocr_score("", "hello") == 0.0
    assert ocr_score("a much longer unrelated text", "abc") == 0.0   # the distance is capped at len(target)


def _render(text: str) -> torch.Tensor:
    """Large black text on white, [3, H, W] in [0, 1]."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (160, 48), "white")
    ImageDraw.Draw(img).text((8, 6), text, fill="black", font=ImageFont.load_default(size=32))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def test_ocr_reads_rendered_text():
    """Near 1 where the image spells the quoted text, lower where it spells another word."""
    pytest.importorskip("rapidocr_onnxruntime", reason="the ocr extra is not installed")
    reward = make_reward("ocr")
    images = torch.stack([_render("hello"), _render("world")])
    r = reward(images, ['a sign that says "hello"', 'a sign that says "hello"'])
    assert r.shape == (2,) and not r.requires_grad
    assert r[0] >= 0.99 and r[1] <= 0.5, r


def test_without_the_extra_the_error_says_what_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ocr(name, *args, **kwargs):
        if name.startswith("rapidocr_onnxruntime"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ocr)
    with pytest.raises(ImportError, match="ocr extra"):
        make_reward("ocr")
    assert "pip install" in OCR_EXTRA


@pytest.mark.parametrize("estimator", ["full", "rlr", "truncated", "auto"])
def test_plans_with_first_order_steps_are_refused_before_anything_is_built(tmp_path, capsys, estimator):
    extra = ["--memory-budget", "1GiB"] if estimator == "auto" else []
    out = tmp_path / "out"
    args = ["--preset", "tiny", "--reward", "ocr", "--estimator", estimator, *extra, "--output-dir", str(out),
            "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("halforder train: error: the reward 'ocr' has no gradient") and err.count("\n") == 1, err
    assert "use estimator reinforce, zeroth_order or rlr_no_fo" in err
    assert not out.exists()


@pytest.mark.parametrize("estimator", ["reinforce", "zeroth_order"])
def test_plans_without_first_order_steps_take_it(estimator):
    assert load_config(None, {"preset": "tiny", "reward": "ocr", "estimator": estimator}).reward == "ocr"


def test_prompts_that_quote_no_text_are_refused_before_the_run(tmp_path, capsys):
    pytest.importorskip("rapidocr_onnxruntime", reason="the ocr extra is not installed")
    out = tmp_path / "out"
    assert main(["--preset", "tiny", "--reward", "ocr", "--estimator", "reinforce", "--output-dir", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("halforder train: error: the ocr reward scores the text a prompt quotes, but 'a red "
                          "square' quotes none") and err.count("\n") == 1, err
    assert not out.exists()
