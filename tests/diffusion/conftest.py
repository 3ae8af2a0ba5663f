"""Tiny random Stable Diffusion components for the diffusion tests (no downloads)."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion import tiny_components  # noqa: E402


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """The tiny models are far faster on one thread (intra-op threads only add overhead,
    and oversubscribe a shared 2-core machine); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here touches the network: the hub is offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny():
    """Fresh tiny SD components with a DDIM scheduler (seed 0)."""
    return tiny_components(0)


@pytest.fixture
def tiny_dpm():
    """Fresh tiny SD components with DPM-Solver++(2M) SDE (seed 0)."""
    return tiny_components(0, scheduler="dpm")


@pytest.fixture
def sd_pipeline():
    """A function from components to a ``StableDiffusionPipeline`` over them (no safety
    checker, no progress bar)."""
    import diffusers

    def make(c):
        pipe = diffusers.StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                                 unet=c.unet, scheduler=c.scheduler, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return make
