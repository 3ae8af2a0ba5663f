"""`halforder train`: the tiny preset end to end, config files, and bad input (clear error, nothing written)."""
import json
import os

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion.checkpoint import save_checkpoint  # noqa: E402
from halforder.diffusion.cli import main  # noqa: E402
from halforder.diffusion.config import TrainConfig, load_config  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_tiny_preset_writes_metrics_grid_adapter_and_checkpoints(tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import load_file

    out = tmp_path / "tiny"
    assert main(["--preset", "tiny", "--steps", "3", "--output-dir", str(out), "--no-progress"]) == 0
    assert "trained 3 updates" in capsys.readouterr().out
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert not r["skipped"] and r["plan"].startswith("rlr(h=2,j=")
        assert 0 <= r["reward_mean"] <= 1                              # brightness of images in [0, 1]
        for key in ("reward_std", "grad_norm", "grad_norm_HO", "grad_norm_ZO", "time_s", "memory_bytes"):
            assert isinstance(r[key], (int, float)) and r[key] > 0, key
        assert r["grad_norm_FO"] >= 0
    assert sorted(os.listdir(out / "samples")) == ["step_00000000.png", "step_00000003.png"]
    im = Image.open(out / "samples" / "step_00000003.png")
    assert im.size == (2 * 16 + 1, 2 * 16 + 1)                       # 4 held-out prompts, 16x16 images
    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora and all("lora" in k for k in lora)
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000003"]
    assert json.load(open(out / "config.json"))["preset"] == "tiny"
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_config_files_and_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("preset: tiny\nlr: 0.5\nestimator: truncated\nk: 3\nj_window: [2, 5]\n")
    t = tmp_path / "c.toml"
    t.write_text('preset = "tiny"\nlr = 0.5\nestimator = "truncated"\nk = 3\nj_window = [2, 5]\n')
    for path in (y, t):
        cfg = load_config(str(path), {"k": 2, "steps": None})
        assert (cfg.lr, cfg.estimator, cfg.k, cfg.steps, cfg.T, cfg.j_window) == (0.5, "truncated", 2, 6, 6, (2, 5))
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown option.*learning_rate"):
        load_config(str(bad))
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.toml"):
        load_config(str(tmp_path / "c.json"))
    assert TrainConfig.__doc__ and TrainConfig().T == 50


def _fails(tmp_path, capsys, args, match):
    out = tmp_path / "out"
    assert main(["--preset", "tiny", "--output-dir", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and match in err, err
    assert not out.exists()                                   # nothing half-written


def test_unknown_reward(tmp_path, capsys):
    _fails(tmp_path, capsys, ["--reward", "beauty"], "unknown reward 'beauty'")


def test_missing_model_path(tmp_path, capsys):
    p = tmp_path / "prompts.txt"
    p.write_text("a cat\n")
    _fails(tmp_path, capsys, ["--prompts", str(p), "--model", str(tmp_path / "no" / "such" / "model")],
           "does not exist")


def test_empty_prompt_file(tmp_path, capsys):
    p = tmp_path / "prompts.txt"
    p.write_text("\n  \n")
    _fails(tmp_path, capsys, ["--prompts", str(p)], "is empty")


def test_h_larger_than_T(tmp_path, capsys):
    _fails(tmp_path, capsys, ["--T", "4", "--h", "5"], "h=5 is too large")


def test_bad_window(tmp_path, capsys):
    _fails(tmp_path, capsys, ["--j-sampling", "window", "--j-window", "2", "3"], "b - a > h")


def test_corrupted_checkpoint(tmp_path, capsys):
    import torch
    ck = save_checkpoint(str(tmp_path / "ck"), 1, {"a": torch.zeros(2)}, {}, {}, [{}])
    with open(os.path.join(ck, "optimizer.pt"), "ab") as f:
        f.write(b"junk")
    _fails(tmp_path, capsys, ["--resume", ck], "corrupted: optimizer.pt")


def test_fresh_run_refuses_an_output_dir_with_checkpoints(tmp_path, capsys):
    import torch
    out = tmp_path / "out"
    save_checkpoint(str(out / "checkpoints"), 1, {"a": torch.zeros(2)}, {}, {}, [{}])
    before = sorted(os.listdir(out))
    assert main(["--preset", "tiny", "--output-dir", str(out), "--no-progress"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before


def test_plan_that_does_not_fit_the_chain(tmp_path, capsys):
    _fails(tmp_path, capsys, ["--estimator", "reinforce", "--eta", "0"], "needs inherent noise")
