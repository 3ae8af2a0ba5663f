"""HPSv2 without open_clip: an open_clip CLIP state dict renamed into transformers' CLIPModel,
checked against a forward pass written here from the architecture (plain torch on the open_clip
weights), and the hpsv2 reward loaded end to end from a tiny checkpoint in local files."""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from halforder.diffusion.rewards.clip_preprocess import ClipPreprocess, clip_preprocess  # noqa: E402
from halforder.diffusion.rewards.open_clip_weights import clip_from_open_clip, open_clip_to_transformers  # noqa: E402
from halforder.diffusion.rewards import make_reward  # noqa: E402

WIDTH, LAYERS, HEADS, PATCH, IMAGE, DIM, CONTEXT = 32, 2, 4, 4, 16, 24, 16


def _tokenizer():
    """A CLIP tokenizer over the byte-level symbols whose end-of-text token has the largest id, as
    in CLIP's BPE (open_clip pools the text at the argmax of the ids)."""
    from tokenizers import pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CONTEXT)


def _config(tok):
    """The tiny counterpart of HPSv2's open_clip ViT-H/14: pre-LN blocks with exact GELU."""
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, max_position_embeddings=CONTEXT, hidden_act="gelu",
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH, hidden_act="gelu"),
        projection_dim=DIM)


def _open_clip_state(vocab: int, seed: int = 0) -> dict:
    """Random weights in open_clip's layout of OpenAI's CLIP (what ``CLIP.state_dict()`` holds)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def ln(p):
        return {f"{p}.weight": 1 + rand(WIDTH, scale=0.1), f"{p}.bias": rand(WIDTH, scale=0.1)}

    def blocks(p):
        out = {}
        for i in range(LAYERS):
            b = f"{p}.resblocks.{i}."
            out.update(ln(b + "ln_1"), **ln(b + "ln_2"))
            out.update({b + "attn.in_proj_weight": rand(3 * WIDTH, WIDTH), b + "attn.in_proj_bias": rand(3 * WIDTH),
                        b + "attn.out_proj.weight": rand(WIDTH, WIDTH), b + "attn.out_proj.bias": rand(WIDTH),
                        b + "mlp.c_fc.weight": rand(4 * WIDTH, WIDTH), b + "mlp.c_fc.bias": rand(4 * WIDTH),
                        b + "mlp.c_proj.weight": rand(WIDTH, 4 * WIDTH), b + "mlp.c_proj.bias": rand(WIDTH)})
        return out

    grid = IMAGE // PATCH
    return {"visual.conv1.weight": rand(WIDTH, 3, PATCH, PATCH), "visual.class_embedding": rand(WIDTH),
            "visual.positional_embedding": rand(grid * grid + 1, WIDTH), **ln("visual.ln_pre"),
            **blocks("visual.transformer"), **ln("visual.ln_post"), "visual.proj": rand(WIDTH, DIM),
            "token_embedding.weight": rand(vocab, WIDTH), "positional_embedding": rand(CONTEXT, WIDTH),
            **blocks("transformer"), **ln("ln_final"), "text_projection": rand(WIDTH, DIM),
            "logit_scale": torch.tensor(4.6052), "attn_mask": torch.full((CONTEXT, CONTEXT), -torch.inf).triu(1)}


# ----------------------------------------------------------------------------- the architecture, written out
def _ln(sd, p, x):
    return F.layer_norm(x, (WIDTH,), sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)


def _tower(sd, p, x, mask=None):
    """open_clip's residual blocks: x + attn(ln_1(x)), then x + mlp(ln_2(x)), GELU, packed q, k, v."""
    n, length, _ = x.shape
    head = WIDTH // HEADS
    for i in range(LAYERS):
        b = f"{p}.resblocks.{i}."
        qkv = F.linear(_ln(sd, b + "ln_1", x), sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"])
        q, k, v = (t.view(n, length, HEADS, head).transpose(1, 2) for t in qkv.chunk(3, -1))
        scores = q @ k.transpose(-1, -2) / head ** 0.5 + (0 if mask is None else mask)
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, WIDTH)
        x = x + F.linear(attn, sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"])
        hidden = F.gelu(F.linear(_ln(sd, b + "ln_2", x), sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"]))
        x = x + F.linear(hidden, sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
    return x


def _encode_image(sd, pixels):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, WIDTH), x], 1) + sd["visual.positional_embedding"]
    x = _tower(sd, "visual.transformer", _ln(sd, "visual.ln_pre", x))
    return _ln(sd, "visual.ln_post", x[:, 0]) @ sd["visual.proj"]


def _encode_text(sd, ids):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    x = _ln(sd, "ln_final", _tower(sd, "transformer", x, torch.full((CONTEXT, CONTEXT), -torch.inf).triu(1)))
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]


def _ids(tok, prompts):
    return tok(prompts, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt").input_ids


# ----------------------------------------------------------------------------- tests
def test_the_renamed_weights_give_open_clips_features():
    tok = _tokenizer()
    sd = _open_clip_state(len(tok))
    model = clip_from_open_clip(sd, _config(tok))
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    ids = _ids(tok, ["a cat", "a red dog on a mat", "x"])
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    torch.testing.assert_close(image, _encode_image(sd, pixels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text, _encode_text(sd, ids), rtol=1e-5, atol=1e-5)
    assert float(model.logit_scale) == pytest.approx(4.6052)
    assert not any(p.requires_grad for p in model.parameters())


def test_a_checkpoint_that_does_not_fit_is_refused():
    tok = _tokenizer()
    sd = _open_clip_state(len(tok))
    with pytest.raises(ValueError, match="no counterpart for visual.attnpool.weight"):
        open_clip_to_transformers({**sd, "visual.attnpool.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="lacks: text_model.final_layer_norm.bias"):
        clip_from_open_clip({k: v for k, v in sd.items() if k != "ln_final.bias"}, _config(tok))
    with pytest.raises(ValueError, match=r"has shapes: visual_projection.weight \(24, 16\)"):
        clip_from_open_clip({**sd, "visual.proj": sd["visual.proj"][:16]}, _config(tok))


def test_hpsv2_reward_from_local_files(tmp_path):
    """The reward: cos(image, prompt) of the open_clip weights on HPSv2's padded preprocessing,
    from a checkpoint file as HPSv2 saves it ({"state_dict": ...}) and a directory holding the
    CLIP config and tokenizer only; differentiable in the images."""
    tok = _tokenizer()
    sd = _open_clip_state(len(tok), seed=2)
    torch.save({"state_dict": sd}, tmp_path / "hps.pt")
    _config(tok).save_pretrained(tmp_path / "processor")
    tok.save_pretrained(tmp_path / "processor")
    reward = make_reward("hpsv2", checkpoint=str(tmp_path / "hps.pt"), processor=str(tmp_path / "processor"),
                         local_files_only=True)
    images = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(3)).requires_grad_()
    prompts = ["a cat", "a red dog"]
    r = reward(images, prompts)
    with torch.no_grad():
        img = _encode_image(sd, clip_preprocess(images, ClipPreprocess(IMAGE, IMAGE, fit="pad")))
        txt = _encode_text(sd, _ids(tok, prompts))
    torch.testing.assert_close(r, F.cosine_similarity(img, txt, dim=-1), rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(r.sum(), images)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_hpsv2_offline_says_how_to_use_a_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))        # an empty cache
    with pytest.raises(OSError, match="(?s)could not load HPSv2 .*--local-dir"):
        make_reward("hpsv2")
