"""Tiny random Stable Diffusion components for the diffusion tests (no downloads), the one
2-process run they share, and the check that a LoRA file loads into a pipeline exactly."""
import dataclasses
import os
import subprocess
import sys

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
def lora_loads_exactly():
    """``check(ours, base, network, x)``: the chain ``base`` with the pipeline's network after
    ``load_lora_weights`` (``network``) gives exactly the output of ``ours`` (the chain whose
    adapter was saved) at ``x`` and step 2, which differs from the base model's."""
    def check(ours, base, network, x):
        loaded = dataclasses.replace(base.denoiser, module=network)
        with torch.no_grad():
            want = ours.denoiser(x, 2, {})
            assert not torch.equal(want, base.denoiser(x, 2, {}))
            assert float((loaded(x, 2, {}) - want).abs().max()) == 0.0
    return check


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


TWO_PROCESS_FLAGS = dict(preset="tiny", steps=1, T=4, eval_every=0)


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory):
    """``halforder train --preset tiny --steps 1 --T 4 --eval-every 0`` (the preset's RLR)
    started as 2 CPU processes with torchrun (gloo), once a session: its output folder, for
    the tests of what the processes share (test_multiprocess.py, test_compute.py), and its
    settings as ``load_config`` overrides."""
    out = tmp_path_factory.mktemp("two_processes") / "mp"
    args = [a for k, v in TWO_PROCESS_FLAGS.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "halforder.diffusion.app.cli", *args, "--output-dir", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, dict(TWO_PROCESS_FLAGS)
