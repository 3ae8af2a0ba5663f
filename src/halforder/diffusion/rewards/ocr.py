"""The OCR reward of Flow-GRPO's text-rendering task: how well an image spells the text its
prompt quotes. It has no gradient in the images (``differentiable = False``), so only plans
without first-order steps (REINFORCE, zeroth order) can train on it.

For a prompt such as ``a sign that says "Hello World"``, the target is the text between the
first pair of double quotes; an OCR engine reads the image, and the lines it recognises are
joined. Both strings lose their spaces and are lowercased; then, as in Flow-GRPO's
``flow_grpo/ocr.py``, the distance d is 0 if the target occurs in the recognised text and
their Levenshtein distance otherwise, and

    reward = 1 - min(d, len(target)) / len(target)        (in [0, 1]).

Flow-GRPO reads with PaddleOCR (English models, no angle classifier); here the engine is
RapidOCR (``rapidocr-onnxruntime``: PaddleOCR's PP-OCRv4 Chinese-English models converted to
ONNX and shipped inside its wheel, so it runs offline), with PaddleOCR's detector resizing and
its 0.5 threshold on recognition scores: the same pipeline, but not the same recogniser weights,
so scores are close to Flow-GRPO's, not equal. Install the ``ocr`` extra.
"""
from __future__ import annotations

from typing import Sequence

import torch

OCR_EXTRA = "the ocr reward needs the ocr extra: pip install -e \".[ocr]\" (rapidocr-onnxruntime, rapidfuzz)"


def quoted_text(prompt: str) -> str:
    """The text between the first pair of double quotes of ``prompt`` (``ValueError`` if none)."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].replace(" ", ""):
        raise ValueError(f"the ocr reward scores the text a prompt quotes, but {prompt!r} quotes none: "
                         f"write e.g. 'a sign that says \"hello\"'")
    return parts[1]


def ocr_score(recognised: str, target: str) -> float:
    """Flow-GRPO's score of the ``recognised`` text against ``target`` (module docstring)."""
    from rapidfuzz.distance import Levenshtein

    recognised, target = recognised.replace(" ", "").lower(), target.replace(" ", "").lower()
    if not target:
        raise ValueError("the ocr reward needs a non-empty target text")
    d = 0 if target in recognised else Levenshtein.distance(recognised, target)
    return 1 - min(d, len(target)) / len(target)


class OcrReward:
    """``reward(images, prompts) -> [N]``: :func:`ocr_score` of the text RapidOCR reads in each
    image ``[N, 3, H, W]`` in [0, 1] against the text its prompt quotes. No gradient."""

    differentiable = False

    def __init__(self):
        try:
            from rapidfuzz.distance import Levenshtein  # noqa: F401  (checked now, used by ocr_score)
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:
            raise ImportError(f"{OCR_EXTRA} ({e})") from e
        # PaddleOCR's detector resizing (longest side at most 960), which Flow-GRPO ran; RapidOCR's
        # own default scales the shortest side up to 736
        self.engine = RapidOCR(det_limit_type="max", det_limit_side_len=960)

    def read(self, image) -> str:
        """The text of one RGB uint8 image ``[H, W, 3]`` (numpy): the recognised lines joined in
        the engine's reading order, as Flow-GRPO joins PaddleOCR's."""
        lines, _ = self.engine(image[..., ::-1].copy(), use_cls=False)   # RapidOCR takes arrays as BGR
        return "".join(text for _, text, score in lines or () if float(score) > 0)

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """``ValueError`` naming the first prompt that quotes no text (before a run starts)."""
        for p in prompts:
            quoted_text(p)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"a reward takes images [N, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        targets = [quoted_text(p) for p in prompts]
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        scores = [ocr_score(self.read(img), t) for img, t in zip(pixels, targets)]
        return torch.tensor(scores, dtype=images.dtype, device=images.device)
