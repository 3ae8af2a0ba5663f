"""`halforder train --preset tiny-video` (task t2v): offline, writes metrics, grids and a GIF
(the README's command, run once in the clone by ``run_in_clone`` and shared with
tests/test_readme_commands.py)."""
import json

import pytest

pytest.importorskip("diffusers")

CLONE_COMMANDS = [TINY_VIDEO] = ["halforder train --preset tiny-video --output-dir runs/tiny-video"]

from halforder.diffusion.app.cli import main  # noqa: E402


def test_tiny_video_cli_run(clone, run_in_clone):
    import imageio

    proc = run_in_clone(TINY_VIDEO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = clone / "runs" / "tiny-video"
    recs = [json.loads(line) for line in open(out / "metrics.jsonl") if "plan" in json.loads(line)]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(r["plan"].startswith("rlr") for r in recs)   # 4 updates
    assert (out / "samples" / "step_00000002.png").exists() and (out / "lora").is_dir()   # evaluated every 2
    assert len(imageio.mimread(out / "samples" / "final.gif")) == 4      # the preset's 4 frames
    assert "trained 4 updates" in proc.stdout


def test_video_cli_bad_input(tmp_path, capsys):
    bad = [["--preset", "tiny-video", "--frames", "sideways"],            # the preset implies --task t2v
           ["--preset", "tiny-video", "--frames", "random"],     # temporal reward needs >= 2 frames
           ["--preset", "tiny-video", "--reward", "no_such_reward"],
           ["--preset", "videocrafter2", "--scheduler", "dpm"],              # refused before any download
           ["--preset", "tiny-video", "--video-model", "videocrafter2", "--scheduler", "dpm"]]
    for argv in bad:
        assert main(argv + ["--output-dir", str(tmp_path / "x"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "error" in err and ("DPM-Solver" in err) == ("dpm" in argv)
    assert not (tmp_path / "x").exists()                                  # nothing half-written


def test_task_is_a_config_field(tmp_path):
    from halforder.diffusion.app.config import load_config

    (tmp_path / "run.yaml").write_text("preset: tiny\ntask: t2v\n")
    assert load_config(str(tmp_path / "run.yaml")).task == "t2v"
    assert load_config(None, preset="tiny-video").task == "t2v"
    assert load_config(None, preset="tiny").task == "t2i"
    (tmp_path / "bad.yaml").write_text("task: t2a\n")
    with pytest.raises(ValueError, match="task must be one of t2i, t2v; got 't2a'"):   # a ConfigError
        load_config(str(tmp_path / "bad.yaml"))


def test_videocrafter2_preset_is_the_official_sampling():
    """The videocrafter2 preset: VideoCrafter2's official sampling settings (DDIM with its
    latent scale, 50 steps, eta 1 at every step, guidance 12, fps 28, 16 frames, latent
    40x64 for 320x512); loading it downloads nothing (the model is fetched only by a run)."""
    from halforder.diffusion.app.config import load_config
    from halforder.diffusion.models.video.components import VIDEOCRAFTER2_UNET

    cfg = load_config(None, preset="videocrafter2")
    cfg.check()
    assert (cfg.task, cfg.model, cfg.video_model, cfg.scheduler) == ("t2v", VIDEOCRAFTER2_UNET, "videocrafter2",
                                                                     "ddim")
    assert (cfg.T, cfg.eta_value(), cfg.guidance_scale, cfg.fps) == (50, 1.0, 12.0, 28.0)
    assert (cfg.num_frames, cfg.latent_size) == (16, [40, 64])
    assert load_config(None, overrides={"task": "t2v", "video_model": "videocrafter2"}).fps == 24.0   # the default
