"""Model families own their options: each declares a frozen record whose settings are TrainConfig
fields of the same name and default, refuses another family's setting naming both, and adjusts its
parts to its options; VideoCrafter2 is a family like the others, and Components holds the further
parts by their pipeline names."""
import dataclasses
import re

import pytest
import torch

pytest.importorskip("diffusers")

from halforder.diffusion.app.cli import main  # noqa: E402
from halforder.diffusion.app.config import TrainConfig, family_options, family_settings, load_config  # noqa: E402
from halforder.diffusion.models.families import (FAMILIES, OPTION_SETTINGS, TINY_MODELS, family_of,  # noqa: E402
                                                 load_components, options_of, tiny_model)
from halforder.diffusion.models.video import VIDEOCRAFTER2_SCALE, tiny_video_components  # noqa: E402


def test_every_option_setting_is_a_config_field_with_the_same_default():
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert set(OPTION_SETTINGS) == {"scheduler", "t5", "shift", "noise", "fps", "video_base"}
    for family in FAMILIES.values():
        assert dataclasses.is_dataclass(family.options) and family.options.__dataclass_params__.frozen
        for f in dataclasses.fields(family.options):
            if "applies" in f.metadata:
                assert f.default == defaults[f.name] == OPTION_SETTINGS[f.name].default, (family.name, f.name)
    assert set(TINY_MODELS) >= {"tiny", "tiny-sd3", "tiny-flux", "tiny-videocrafter2"}


@pytest.mark.parametrize("family,settings,match", [
    ("flux", dict(t5=False), "no_t5 applies to SD3 models; 'x' is a FLUX.1 model"),
    ("sana", dict(shift=2.0), "shift applies to flow-matching models (SD3, FLUX, Wan, Qwen-Image); 'x' is a SANA"),
    ("wan", dict(scheduler="dpm"), "scheduler 'dpm' applies to UNet models"),
    ("sd3", dict(fps=8.0), "fps applies to VideoCrafter2 models"),
    ("sd", dict(video_base="some/base"), "video_base 'some/base' applies to VideoCrafter2 models"),
])
def test_a_setting_another_family_takes_is_refused_naming_both(family, settings, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        options_of(FAMILIES[family], "'x'", **settings)
    options_of(FAMILIES[family], "'x'", t5=True, shift=None, scheduler="ddim", fps=24.0)   # defaults: no error


def test_a_familys_own_values_are_checked_by_its_record():
    with pytest.raises(ValueError, match="DPM-Solver"):
        options_of(FAMILIES["videocrafter2"], scheduler="dpm")
    with pytest.raises(ValueError, match="shift must be > 0"):
        options_of(FAMILIES["sd3"], shift=-1.0)
    with pytest.raises(TypeError, match="unknown model option 'no_such'"):
        options_of(FAMILIES["sd"], no_such=1)
    assert options_of(FAMILIES["sd3"], t5=False, shift=2.0) == FAMILIES["sd3"].options(shift=2.0, t5=False)


def test_the_family_adjusts_its_parts_to_its_options():
    c = tiny_model("tiny-sd3", t5=False, shift=2.0)
    assert c.text_encoder_3 is None and c.tokenizer_3 is None and c.scheduler.config.shift == 2.0
    assert c.options == FAMILIES["sd3"].options(shift=2.0, t5=False)
    assert tiny_model("tiny-sd3").text_encoder_3 is not None and c.text_encoder_2 is not None
    assert len(tiny_model("tiny-sd3").modules()) == 5 and len(c.modules()) == 4      # T5 is gone
    assert tiny_model("tiny-flux", shift=5.0).scheduler.config.shift == 5.0
    assert type(tiny_model("tiny", scheduler="dpm").scheduler).__name__ == "DPMSolverMultistepScheduler"
    with pytest.raises(AttributeError, match="no_such_part"):
        c.no_such_part


def test_the_flow_noise_family_travels_in_the_options_record():
    """A run's noise reaches the parts' options record, which the family's solver reads; a task given
    noise puts it there (keeping the other options); UNet models and SANA take no noise."""
    from halforder.diffusion.models.families import with_noise
    from halforder.diffusion.models.sd_chain import model_solver

    settings = family_settings(TrainConfig(model="tiny-flux", noise="cps", shift=5.0, output_dir=None))
    c = tiny_model("tiny-flux", **{k: v for k, v in settings.items() if k != "family"})
    assert c.options == FAMILIES["flux"].options(shift=5.0, noise="cps") and model_solver(c, 4).noise == "cps"
    plain = tiny_model("tiny-flux", shift=5.0)
    assert plain.options.noise == "sde" and model_solver(plain, 4).noise == "sde"
    assert with_noise(plain, "cps").options == c.options and with_noise(plain, "sde") is plain
    for family in ("sd3", "wan", "qwen-image"):
        assert model_solver(tiny_model(TINY_MODELS_OF[family], noise="cps"), 3, (16, 4, 4)).noise == "cps", family
    with pytest.raises(ValueError, match=re.escape("noise 'cps' is for flow-matching models (SD3, FLUX, Wan) and "
                                                   "Qwen-Image, where eta > 0; 'x' is a SANA")):
        options_of(FAMILIES["sana"], "'x'", noise="cps")
    with pytest.raises(ValueError, match="noise 'cps' is for flow-matching models"):
        with_noise(tiny_model("tiny"), "cps")
    with pytest.raises(ValueError, match="noise must be one of sde, cps"):
        options_of(FAMILIES["flux"], noise="ode")


TINY_MODELS_OF = {f.name: name for name, f in TINY_MODELS.items()}


def test_an_sd3_option_given_to_flux_exits_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--preset", "tiny-flux", "--no-t5", "--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == "halforder train: error: no_t5 applies to SD3 models; 'tiny-flux' is a FLUX.1 model\n"
    assert not out.exists()


def test_videocrafter2_is_a_family(tmp_path, monkeypatch):
    """The run's video_model names the family; its tiny parts and its loading go through the shared
    path and carry its options (the latent scale the solvers use); a plain UNet3D stays SD's."""
    cfg = load_config(None, preset="tiny-video", overrides={"video_model": "videocrafter2", "fps": 8.0})
    settings = family_settings(cfg)
    assert settings["family"] == "videocrafter2" and settings["fps"] == 8.0
    assert family_options(cfg, "videocrafter2") == FAMILIES["videocrafter2"].options(fps=8.0)
    c = tiny_model(cfg.model, video=True, **settings)
    assert family_of(c).name == "videocrafter2" and c.latent_scale == VIDEOCRAFTER2_SCALE and c.unet.config.fps == 8.0
    plain = tiny_model("tiny", video=True)
    assert family_of(plain).name == "sd" and plain.latent_scale is None
    assert type(plain.unet).__name__ == "UNet3DConditionModel"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    made = tiny_video_components(0, fps_cond=True)
    made.unet.save_pretrained(tmp_path / "vc2")
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(made, name).save_pretrained(tmp_path / "base" / name)
    loaded = load_components(str(tmp_path / "vc2"), video=True, family="videocrafter2", fps=12.0,
                             video_base=str(tmp_path / "base"))
    assert loaded.family == "videocrafter2" and loaded.latent_scale == VIDEOCRAFTER2_SCALE
    assert loaded.unet.config.fps == 12.0 and loaded.options.video_base == str(tmp_path / "base")
    x, ctx = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 5, 16)
    torch.testing.assert_close(loaded.unet(x, 300, encoder_hidden_states=ctx).sample,
                               made.unet(x, 300, encoder_hidden_states=ctx, fps=12).sample)
    with pytest.raises(ValueError, match="DPM-Solver"):
        load_components(str(tmp_path / "nowhere"), video=True, family="videocrafter2", scheduler="dpm")
