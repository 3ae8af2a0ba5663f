"""Checkpoints a user can try: every checkpoint directory holds the LoRA file the pipeline
loads, with the weights of that step; `halforder export` writes it out, or fuses it into a
pipeline folder that diffusers loads and that computes what the adapted network computes."""
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.cli import main  # noqa: E402
from halforder.diffusion import add_lora, make_chain, make_reward, set_lora, tiny_model  # noqa: E402
from halforder.diffusion.models.lora import LORA_FILE  # noqa: E402
from halforder.training.checkpoints import load_checkpoint  # noqa: E402


@pytest.fixture(scope="module", params=["tiny", "tiny-sd3"])
def run(request, tmp_path_factory):
    """A 3-update run with a checkpoint at steps 2 and 3; (preset, its output directory)."""
    out = tmp_path_factory.mktemp(request.param) / "run"
    assert main(["train", "--preset", request.param, "--steps", "3", "--checkpoint-every", "2", "--eval-every", "0",
                 "--output-dir", str(out), "--no-progress"]) == 0
    return request.param, out


def _denoiser_out(components, params=None):
    """The network's output on fixed inputs, with the LoRA weights ``params`` (None: as it is)."""
    if params is not None:
        add_lora(components.unet, rank=2, alpha=2.0, init=False, seed=0)
        set_lora(components.unet, params)
    chain = make_chain(components, 2, ["a red square"], make_reward("brightness"), guidance_scale=2.0)
    x = chain.sample_start(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return chain.denoiser(x, 2, {})


def _pipeline_class(preset):
    import diffusers
    return diffusers.StableDiffusionPipeline if preset == "tiny" else diffusers.StableDiffusion3Pipeline


def test_every_checkpoint_holds_the_lora_file_of_its_step(run):
    preset, out = run
    ck2, ck3 = (load_checkpoint(str(out / "checkpoints" / f"step_0000000{s}")) for s in (2, 3))
    assert any(not torch.equal(ck2.params[k], ck3.params[k]) for k in ck2.params)   # it trained in between
    for ck in (ck2, ck3):
        from safetensors.torch import load_file
        saved = load_file(f"{ck.path}/lora/{LORA_FILE}")
        prefix = "unet." if preset == "tiny" else "transformer."
        assert {k.removeprefix(prefix).replace(".weight", ".default.weight") for k in saved} == set(ck.params)
        for k, v in saved.items():
            assert torch.equal(v, ck.params[k.removeprefix(prefix).replace(".weight", ".default.weight")])
        pipe = _pipeline_class(preset)(**_parts(tiny_model(preset)))
        pipe.load_lora_weights(f"{ck.path}/lora")
        assert torch.equal(_denoiser_out(_with_network(tiny_model(preset), pipe)),
                           _denoiser_out(tiny_model(preset), ck.params))


def _parts(c):
    from halforder.diffusion.models.families import family_of
    pipe = family_of(c).pipeline(c)
    return dict(pipe.components)


def _with_network(c, pipe):
    import dataclasses
    return dataclasses.replace(c, unet=pipe.unet if hasattr(pipe, "unet") else pipe.transformer)


def test_export_writes_the_lora_file_and_a_fused_folder(run, tmp_path, capsys):
    preset, out = run
    ck = str(out / "checkpoints" / "step_00000003")
    assert main(["export", ck, str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora" / LORA_FILE).read_bytes() == (out / "checkpoints" / "step_00000003" / "lora" /
                                                            LORA_FILE).read_bytes()
    without = tmp_path / "old"                           # a checkpoint without its LoRA file: rebuilt from params
    shutil.copytree(ck, without)
    shutil.rmtree(without / "lora")
    assert main(["export", str(without), str(tmp_path / "rebuilt")]) == 0
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "lora" / LORA_FILE), load_file(tmp_path / "rebuilt" / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert main(["export", ck, str(tmp_path / "fused"), "--fuse"]) == 0
    fused = _pipeline_class(preset).from_pretrained(tmp_path / "fused")
    assert not any(".lora_" in n for n, _ in fused.components[("unet" if preset == "tiny" else "transformer")]
                   .named_parameters())
    want = _denoiser_out(tiny_model(preset), load_checkpoint(ck).params)
    got = _denoiser_out(_with_network(tiny_model(preset), fused))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)       # W + BA, summed once instead of at run time


def test_export_refuses_what_it_cannot_do(run, tmp_path, capsys):
    _, out = run
    ck = str(out / "checkpoints" / "step_00000003")
    (tmp_path / "taken").mkdir()
    for argv, message in ((["export", ck, str(tmp_path / "taken")], "exists: give a new directory"),
                          (["export", str(tmp_path / "nowhere"), str(tmp_path / "x")], "does not exist")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("halforder export: error: ") and message in err and err.count("\n") == 1, err


def test_a_run_folder_exports_its_newest_checkpoint(run, tmp_path, capsys):
    _, out = run
    assert main(["export", str(out), str(tmp_path / "lora")]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0] == f"{out} is a run folder: exporting its newest checkpoint, {out / 'checkpoints' / 'step_00000003'}"
    assert (tmp_path / "lora" / LORA_FILE).read_bytes() == (out / "checkpoints" / "step_00000003" / "lora" /
                                                            LORA_FILE).read_bytes()
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no checkpoint yet" in err and "corrupted" not in err, err


def test_a_video_unet_exports_its_lora_file_but_cannot_fuse(tmp_path, capsys):
    out = tmp_path / "video"
    assert main(["train", "--preset", "tiny-video", "--steps", "1", "--eval-every", "0", "--output-dir", str(out),
                 "--no-progress"]) == 0
    ck = str(out / "checkpoints" / "step_00000001")
    assert main(["export", ck, str(tmp_path / "lora")]) == 0
    assert main(["export", ck, str(tmp_path / "fused"), "--fuse"]) == 2
    assert "cannot fuse LoRA in diffusers" in capsys.readouterr().err
    assert not (tmp_path / "fused").exists()
