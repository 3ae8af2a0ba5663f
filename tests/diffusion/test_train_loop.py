"""Sample grids of a training run (halforder.diffusion.app.previews).

The training loop's own tests (NaN/inf skip, checkpoint format and corruption, gradient
accumulation, resume checks, gradient checkpointing) run on a toy task and live in
tests/test_training.py, beside the model-agnostic loop they test."""
import os

import pytest
import torch

pytest.importorskip("PIL")

from halforder.diffusion.app.previews import save_grid  # noqa: E402


def test_save_grid_writes_a_png(tmp_path):
    from PIL import Image
    images = torch.zeros(3, 3, 5, 4)
    images[1] = 1.0
    save_grid(images, str(tmp_path / "g" / "grid.png"))
    im = Image.open(tmp_path / "g" / "grid.png")
    assert im.size == (2 * 4 + 1, 2 * 5 + 1)   # 2x2 grid with 1-pixel gaps
    arr = torch.from_numpy(__import__("numpy").asarray(im).copy())
    assert arr.shape == (11, 9, 3)
    assert (arr[:5, 5:] == 255).all() and (arr[:5, :4] == 0).all()
    assert os.listdir(tmp_path / "g") == ["grid.png"]
