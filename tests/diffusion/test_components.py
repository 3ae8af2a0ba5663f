"""Components: tiny ones built offline, real loading from a local copy, clear errors otherwise."""
import pytest
import torch

from halforder.diffusion import encode_prompts, load_components, tiny_components

diffusers = pytest.importorskip("diffusers")


def test_tiny_components_are_seeded_and_frozen():
    a, b, c = tiny_components(0), tiny_components(0), tiny_components(1)
    sa, sb, sc = a.unet.state_dict(), b.unet.state_dict(), c.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not any(p.requires_grad for m in (a.unet, a.vae, a.text_encoder) for p in m.parameters())
    emb = encode_prompts(a, ["a cat", "a much longer prompt than sixteen tokens can hold"])
    assert emb.shape == (2, 16, a.unet.config.cross_attention_dim)
    assert type(tiny_components(0, scheduler="dpm").scheduler).__name__ == "DPMSolverMultistepScheduler"
    with pytest.raises(ValueError, match="unknown scheduler"):
        tiny_components(0, scheduler="euler")


def test_load_components_from_a_local_copy(tmp_path, monkeypatch, sd_pipeline):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = tiny_components(0)
    pipe = sd_pipeline(tiny)
    pipe.save_pretrained(tmp_path / "sd")
    for kind in ("ddim", "dpm"):
        c = load_components(str(tmp_path / "sd"), local_files_only=True, scheduler=kind)
        for mine, ref in ((c.unet, tiny.unet), (c.vae, tiny.vae), (c.text_encoder, tiny.text_encoder)):
            s, r = mine.state_dict(), ref.state_dict()
            assert s.keys() == r.keys() and all(torch.equal(s[k], r[k]) for k in s)
            assert not any(p.requires_grad for p in mine.parameters())
        torch.testing.assert_close(encode_prompts(c, ["a cat"]), encode_prompts(tiny, ["a cat"]))
    assert c.scheduler.config.algorithm_type == "sde-dpmsolver++"


def test_missing_model_errors_say_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="does not exist.*--local-dir"):
        load_components(str(tmp_path / "nowhere"))
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="lacks the subfolders"):
        load_components(str(tmp_path / "half"))
    with pytest.raises(OSError, match="local copy|--local-dir"):
        load_components("no-such-org/no-such-model", local_files_only=True)


@pytest.mark.parametrize("name", ["tiny", "tiny-sd3", "tiny-flux", "tiny-wan", "tiny-qwen-image", "tiny-sana"])
def test_parts_are_held_by_their_pipeline_names(name):
    """Every family's parts are named as its diffusers pipeline names them (the network as
    ``unet`` or ``transformer``), and a part given by that name replaces the network."""
    from halforder.diffusion.models.families import family_of, tiny_model

    c = tiny_model(name)
    pipeline = family_of(c).pipeline(c).components   # its optional parts (a safety checker, ...) are None
    assert {k for k, v in c.parts.items() if v is not None} == {k for k, v in pipeline.items() if v is not None}
    assert all(pipeline[k] is v for k, v in c.parts.items())
    assert getattr(c, c.network) is c.unet is c.parts[c.network]
    other = torch.nn.Linear(1, 1)
    assert c.with_parts(**{c.network: other}).unet is other
