"""Rewards: the registry, differentiable CLIP preprocessing, and the loaders (offline, tiny CLIP)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from halforder.diffusion.models.components import tiny_tokenizer
from halforder.diffusion.rewards.clip_preprocess import CLIP_MEAN, CLIP_STD, ClipPreprocess, clip_preprocess
from halforder.diffusion.rewards import REWARDS, aesthetic_head, load_aesthetic, load_pickscore, make_reward

transformers = pytest.importorskip("transformers")
# one uint8 step after normalisation: CLIPImageProcessor's PIL path rounds to uint8
LEVEL = 1 / 255 / min(CLIP_STD)


def _images(n=2, h=16, w=16, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_registry():
    assert {"brightness", "color", "random_cnn", "aesthetic", "pickscore", "clipscore", "hpsv2", "ocr",
            "imagereward"} <= set(REWARDS)
    with pytest.raises(ValueError, match="unknown reward 'nope'.*brightness.*random_cnn"):
        make_reward("nope")


@pytest.mark.parametrize("name,kwargs", [("brightness", {}), ("brightness", {"target": 0.3}),
                                         ("color", {"target": (0.0, 1.0, 0.0)}), ("random_cnn", {"seed": 3})])
def test_builtin_rewards_are_differentiable(name, kwargs):
    reward = make_reward(name, **kwargs)
    images = _images().requires_grad_()
    r = reward(images, ["a", "b"])
    assert r.shape == (2,) and torch.isfinite(r).all()
    (g,) = torch.autograd.grad(r.sum(), images)
    assert g.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        reward(torch.rand(2, 16, 16), ["a", "b"])


def test_builtin_values():
    img = torch.zeros(1, 3, 4, 4)
    img[:, 0] = 1.0  # pure red
    assert make_reward("brightness")(img, [""]).item() == pytest.approx(1 / 3)
    assert make_reward("brightness", target=1 / 3)(img, [""]).item() == pytest.approx(0.0)
    assert make_reward("color", target=(1, 0, 0))(img, [""]).item() == pytest.approx(0.0)
    assert make_reward("color", target=(0, 0, 0))(img, [""]).item() == pytest.approx(-1.0)
    a, b = make_reward("random_cnn", seed=1), make_reward("random_cnn", seed=1)
    x = _images()
    assert torch.equal(a(x, ["", ""]), b(x, ["", ""]))
    assert not torch.equal(a(x, ["", ""]), make_reward("random_cnn", seed=2)(x, ["", ""]))


def _processor(size):
    return transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _reference(proc, u8):
    out = proc(images=[u.permute(1, 2, 0).numpy() for u in u8], return_tensors="np").pixel_values
    return torch.as_tensor(np.asarray(out))


@pytest.mark.parametrize("h,w,size", [(32, 32, 32), (32, 48, 32), (64, 64, 32), (40, 48, 32), (16, 16, 32),
                                      (30, 50, 24)])
def test_preprocess_matches_clip_image_processor(h, w, size):
    """Same images through transformers' CLIPImageProcessor (PIL, uint8) and through
    clip_preprocess (float). Without resizing they agree to float rounding; with a
    resize the processor rounds to uint8 after each PIL pass, so they agree to 1.5 uint8
    steps (after normalisation), on smooth images and on white noise alike."""
    proc = _processor(size)
    g = torch.Generator().manual_seed(h * w)
    noise = torch.randint(0, 256, (2, 3, h, w), generator=g, dtype=torch.uint8)
    smooth = (F.interpolate(torch.rand(2, 3, 4, 4, generator=g), size=(h, w), mode="bilinear") * 255).round()
    cfg = ClipPreprocess.from_processor(proc)
    assert (cfg.size, cfg.crop_size) == (size, size)
    for u8 in (noise, smooth.to(torch.uint8)):
        ref = _reference(proc, u8)
        mine = clip_preprocess(u8.float() / 255, cfg)
        assert mine.shape == ref.shape
        atol = 1e-6 if min(h, w) == size else 1.5 * LEVEL
        torch.testing.assert_close(mine, ref, rtol=0, atol=atol)


def test_preprocess_is_differentiable():
    x = _images(h=40, w=48).requires_grad_()
    (g,) = torch.autograd.grad(clip_preprocess(x, ClipPreprocess(32, 32)).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# ----------------------------------------------------------------------------- loaders
def _tiny_clip_dir(tmp_path, split=False):
    """A tiny random CLIP model + tokenizer + image processor saved as a local directory (with
    ``split``: the model in ``clip/``, the tokenizer and image processor alone in ``processor/``)."""
    tok = tiny_tokenizer(16)
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    model = transformers.CLIPModel(config).eval()
    d = tmp_path / "clip"
    model.save_pretrained(d)
    p = tmp_path / "processor" if split else d
    tok.save_pretrained(p)
    _processor(32).save_pretrained(p)
    return (d, p, model, tok) if split else (d, model, tok)


def test_aesthetic_loads_local_copy(tmp_path):
    d, model, _ = _tiny_clip_dir(tmp_path)
    torch.manual_seed(1)
    head = aesthetic_head(8).eval()
    torch.save(head.state_dict(), tmp_path / "head.pth")
    reward = load_aesthetic(str(d), str(tmp_path / "head.pth"), local_files_only=True)
    u8 = (_images(2, 32, 32) * 255).round().to(torch.uint8)
    pixels = _reference(_processor(32), u8)
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        ref = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(reward(u8.float() / 255, ["", ""]), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["pickscore", "clipscore"])
def test_clip_score_rewards_load_local_copies(tmp_path, name):
    """PickScore with its model and its processor in different directories (the processor's holds
    no model: nothing but its files is read), and the CLIP score (scale 100), against CLIPModel's
    own logits on the CLIP image processor's pixels."""
    d, p, model, tok = _tiny_clip_dir(tmp_path, split=True)
    assert not any(f.name.endswith((".safetensors", ".bin")) for f in p.iterdir())
    if name == "pickscore":
        reward, scale = load_pickscore(str(d), str(p), local_files_only=True), 1.0
    else:
        import shutil
        for f in p.iterdir():
            shutil.copy(f, d)
        reward, scale = make_reward("clipscore", model=str(d), local_files_only=True), 100 / model.logit_scale.exp()
    u8 = (_images(2, 32, 32) * 255).round().to(torch.uint8)
    prompts = ["a cat", "a red dog"]
    ids = tok(prompts, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask,
                    pixel_values=_reference(_processor(32), u8)).logits_per_image.diagonal() * scale
    images = (u8.float() / 255).requires_grad_()
    r = reward(images, prompts)
    torch.testing.assert_close(r, ref, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(r.sum(), images)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("name,kwargs", [("aesthetic", {"clip": "no-such-org/no-such-clip"}),
                                         ("pickscore", {"model": "no-such-org/no-such-clip"})])
def test_loaders_fail_offline_with_instructions(monkeypatch, name, kwargs):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="--local-dir"):
        make_reward(name, local_files_only=True, **kwargs)


def test_missing_local_path(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        make_reward("aesthetic", clip=str(tmp_path / "missing"), local_files_only=True)


def test_imagereward_says_why_it_is_not_available():
    with pytest.raises(ValueError, match="needs transformers <= 4.55 and halforder needs >= 4.56"):
        make_reward("imagereward")


def test_aesthetic_head_missing_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d, _, _ = _tiny_clip_dir(tmp_path)
    with pytest.raises(OSError, match="--local-dir"):
        load_aesthetic(str(d), "no-such-org/no-such-head:head.pth", local_files_only=True)


@pytest.mark.parametrize("h,w", [(32, 48), (48, 20), (31, 31), (64, 40)])
def test_hpsv2_preprocessing_pads_as_hpsv2_does(h, w):
    """HPSv2's ResizeMaxSize on PIL images (longest edge to the size, bicubic, then black borders:
    left/top get half the padding, rounded down), written out with PIL, against
    clip_preprocess(fit="pad") on the float images: the same to 1.5 uint8 steps (PIL rounds to
    uint8 after each resampling pass), and the whole image is kept where crop would cut it."""
    from PIL import Image

    size = 24
    g = torch.Generator().manual_seed(h * w)
    u8 = (F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(h, w), mode="bilinear") * 255).round().to(
        torch.uint8)
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    img = Image.fromarray(u8[0].permute(1, 2, 0).numpy()).resize((nw, nh), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
    ref = torch.as_tensor(np.array(canvas), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    cfg = ClipPreprocess(size=size, crop_size=size, fit="pad")
    torch.testing.assert_close(clip_preprocess(u8.float() / 255, cfg), (ref - mean) / std, rtol=0, atol=1.5 * LEVEL)
    if h != w:   # the padding is black (0 before normalisation) where crop would have cut the image
        padded = clip_preprocess(u8.float() / 255, cfg) * std + mean
        border = padded[..., 0, :] if h < w else padded[..., :, 0]
        assert float(border.abs().max()) < 1e-6
