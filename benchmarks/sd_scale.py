"""Every plan at Stable Diffusion scale: activation memory, time, and numerical agreement.

A UNet and VAE built from configs with random weights (memory and time do not depend on
the weight values), LoRA on the attention projections, DDIM with the paper's eta recipe,
classifier-free guidance, the ``brightness`` reward on the decoded image, and the
library's own ``estimate``. Per plan, with and without "lean" checkpointing (every step
evaluated with gradients and the VAE decoder's blocks recomputed in backward):

- peak activation memory: the bytes autograd keeps (``SavedTensorMeter``, deterministic,
  any device) and on CUDA also ``max_memory_allocated`` above the weights;
- the reference it is held to: one step graph plus the states (the goal is <= 1.1x);
- seconds per estimate and their ratio to the no-grad rollout, eager and compiled
  (``--repeats 0`` skips timing: memory only, e.g. on a CPU).

Then the agreement checks: per-sample estimates with ``vmap`` against the per-sample loop,
and a bf16 base against a float32 base, from the same noise.

    python benchmarks/sd_scale.py --tiny                                  # CPU smoke run (seconds)
    python benchmarks/sd_scale.py --size quarter --T 6 --repeats 0       # CPU, memory only (minutes)
    python benchmarks/sd_scale.py --size sd14 --device cuda --out docs/results/sd_scale_h100.md
    python benchmarks/sd_scale.py --size sd35m --latent 16 --guidance 1 --T 4 --repeats 0   # CPU, SD3.5 (30 min)

Sizes: ``tiny`` (the test components), ``quarter`` (SD 1.4's UNet and VAE at a quarter of
their width), ``sd14`` (SD 1.4: 860 M UNet parameters), ``sd21`` (SD 2.1, 768x768), ``sd35m``
(SD3.5 medium's MMDiT, 2.2 B parameters, and its 16-channel VAE, with 77 + 256 text tokens of
random embeddings: CLIP's and T5's). ``--latent`` sets the latent size (SD3.5: 128 = 1024 px),
``--guidance`` the CFG weight (1: none); ``--scaling`` adds one step graph's bytes at several
latent sizes, to extrapolate from a size a CPU can run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from halforder.diffusion import NoiseScales, add_lora, image_view, make_chain, make_reward
from halforder.diffusion.models.components import SD_SCHEDULER_CONFIG, Components, make_scheduler, tiny_components
from halforder.estimators import Plan, SavedTensorMeter, estimate
from halforder.estimators.gradient_checkpointing import Checkpointed, checkpoint_blocks
from halforder.training.files import write_text

SIZES = {  # UNet2DConditionModel and AutoencoderKL keyword arguments, text width, latent size
    "quarter": (dict(block_out_channels=(80, 160, 320, 320), norm_num_groups=16, cross_attention_dim=768,
                     attention_head_dim=8), dict(block_out_channels=(32, 64, 128, 128), norm_num_groups=16), 768, 32),
    "sd14": (dict(cross_attention_dim=768, attention_head_dim=8), dict(block_out_channels=(128, 256, 512, 512)),
             768, 64),
    "sd21": (dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
             dict(block_out_channels=(128, 256, 512, 512)), 1024, 96),
}


def build(size: str, dtype: torch.dtype, device: str, seed: int = 0):
    """Components (no text encoder), a prompt encoder of fixed random embeddings, LoRA params."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if size == "sd35m":
            comp, encoder = sd35m()
        elif size == "tiny":
            comp = tiny_components(seed)
            width, encoder = 16, None
        else:
            unet_kw, vae_kw, width, latent = SIZES[size]
            unet = UNet2DConditionModel(sample_size=latent, **unet_kw)
            vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                layers_per_block=2, latent_channels=4, sample_size=8 * latent, **vae_kw)
            comp = Components(unet, vae, None, None, make_scheduler("ddim", SD_SCHEDULER_CONFIG)).freeze()
            table = torch.randn(2, 77, width)
            encoder = (lambda prompts: table[[0 if p else 1 for p in prompts]])
        params = add_lora(comp.unet, rank=4, init=False, seed=seed)
    comp.to(device, dtype)
    params = {k: v.detach().to(device, torch.float32) for k, v in params.items()}
    return comp, encoder, params


def sd35m():
    """SD3.5 medium's transformer and VAE from their configs (random weights) and an encoder of
    fixed random conditioning: 77 CLIP + 256 T5 tokens of width 4096, pooled width 2048."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024)
    comp = Components(transformer, vae, None, None, FlowMatchEulerDiscreteScheduler(shift=3.0), family="sd3").freeze()
    table = {"encoder_hidden_states": torch.randn(2, 77 + 256, 4096), "pooled_projections": torch.randn(2, 2048)}
    return comp, (lambda prompts: {k: v[[0 if p else 1 for p in prompts]] for k, v in table.items()})


def plans(T: int):
    """(label, plan, batching) of every plan measured."""
    j = T // 2
    yield "zeroth_order", Plan.zeroth_order(T), "vmap"
    for h in (1, 2, 3):
        yield f"rlr h={h}", Plan.rlr(T, h, j), "vmap"
    yield "rlr h=2, per-sample loop", Plan.rlr(T, 2, j), "loop"
    yield "truncated K=1", Plan.truncated(T, 1), "vmap"
    yield "full", Plan.full(T), "vmap"
    yield "reinforce", Plan.reinforce(T), "vmap"


LATENT, GUIDANCE = None, 7.5     # the latent size (None: the model's own) and CFG weight; main() sets them


def chain_for(setup, plan, batch, batching="vmap", lean=False, compile=None):
    """The benchmark's chain for ``plan`` (``lean``: steps and VAE decoder checkpointed;
    ``compile``: a torch.compile mode for the denoiser)."""
    comp, encoder, _ = setup
    chain = make_chain(comp, plan.T, ["a photo of a cat"] * batch, make_reward("brightness"), guidance_scale=GUIDANCE,
                       batching=batching, encoder=encoder, compile=compile, view=image_view(comp, LATENT)
                       ).for_plan(plan, NoiseScales(eta_plan=0.1 if comp.family == "sd" else 0.7, zo_sigma=1e-3))
    checkpoint_blocks(comp.vae, lean)
    return Checkpointed(chain) if lean else chain


def weights(comp):
    """The frozen weights and buffers, which the meter leaves out."""
    return [t for m in comp.modules() for t in (*m.parameters(), *m.buffers())]


def step_graph_bytes(setup, T: int, batch: int) -> tuple[int, int]:
    """Saved bytes of one step's graph (gradients to the LoRA weights) and of one state."""
    comp, _, params = setup
    chain = chain_for(setup, Plan.full(T), batch)
    x = chain.sample_start(batch, torch.Generator(device=chain.device).manual_seed(0))
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    with SavedTensorMeter(weights(comp)) as meter, torch.enable_grad():
        chain.step(T // 2, x, leaves)
    return meter.peak, x.numel() * x.element_size()


def run_estimate(setup, chain, plan, batch, seed=0, per_sample=False):
    """One estimate with a leave-one-out baseline, from a seeded start."""
    g = torch.Generator(device=chain.device).manual_seed(seed)
    x = chain.sample_start(batch, g)
    return estimate(chain, plan, setup[2], x, generator=g, baseline="loo", per_sample=per_sample)


def measure(setup, plan, batch, batching, lean, repeats, compile=None):
    """(saved peak bytes, CUDA peak bytes or None, best seconds or None); the first run, which
    is measured for memory, also warms up (and compiles)."""
    comp = setup[0]
    chain = chain_for(setup, plan, batch, batching, lean, compile)
    cuda = chain.device.type == "cuda"
    with SavedTensorMeter(weights(comp)) as meter:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        run_estimate(setup, chain, plan, batch)
    cuda_peak = torch.cuda.max_memory_allocated() - base if cuda else None
    return meter.peak, cuda_peak, best_time(lambda: run_estimate(setup, chain, plan, batch), repeats, cuda)


def best_time(fn, repeats, cuda) -> float | None:
    """Best wall-clock seconds of ``repeats`` calls (synchronised on CUDA); None for 0 repeats."""
    best = None
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best or float("inf"), time.perf_counter() - t0)
    return best


def rollout_seconds(setup, T, batch, repeats, compile=None):
    """Best seconds of a no-grad rollout and its reward (the floor every plan is held to)."""
    from halforder.diffusion.sampling.chain import rollout

    chain = chain_for(setup, Plan.zeroth_order(T), batch, compile=compile).with_noise(0.0, 0.0)
    g = torch.Generator(device=chain.device).manual_seed(0)
    x = chain.sample_start(batch, g)
    return best_time(lambda: chain.reward(rollout(chain, setup[2], x)), repeats, chain.device.type == "cuda")


def agreement(size, device, T, batch):
    """Largest |difference| / largest |entry| of per-sample RLR(h=2) estimates, per part:
    vmap against the loop (bf16 base), and bf16 against float32 (vmap), same noise."""
    plan = Plan.rlr(T, 2, T // 2)
    runs = {}
    for dtype, batching in ((torch.bfloat16, "vmap"), (torch.bfloat16, "loop"), (torch.float32, "vmap")):
        setup = build(size, dtype, device)
        runs[dtype, batching] = run_estimate(setup, chain_for(setup, plan, batch, batching), plan, batch,
                                             per_sample=True)
        del setup
    out = {}
    for name, a, b in (("vmap vs loop (bf16)", runs[torch.bfloat16, "vmap"], runs[torch.bfloat16, "loop"]),
                       ("bf16 vs fp32 (vmap)", runs[torch.bfloat16, "vmap"], runs[torch.float32, "vmap"])):
        out[name] = {r: max((a.parts[r][k] - b.parts[r][k]).abs().max().item() for k in a.grad)
                     / max(max(b.parts[r][k].abs().max().item() for k in a.grad), 1e-30) for r in ("FO", "HO", "ZO")}
    return out


def main(argv=None):
    """Measure and write the markdown table (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("tiny", *SIZES, "sd35m"), default="sd14")
    ap.add_argument("--latent", type=int, default=None, help="latent size (default: the model's own)")
    ap.add_argument("--guidance", type=float, default=7.5, help="CFG weight (1: no guidance)")
    ap.add_argument("--scaling", type=int, nargs="*", default=[], help="latent sizes at which to measure one step "
                    "graph (bytes per image token)")
    ap.add_argument("--tiny", action="store_true", help="smoke run: --size tiny --device cpu --T 6 --repeats 0")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="the frozen model's dtype")
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--batch", type=int, nargs="+", default=[2])
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per plan after a warm-up (0: memory only)")
    ap.add_argument("--compile", default="reduce-overhead", help="torch.compile mode for the compiled rollout floor "
                    "('no' to skip)")
    ap.add_argument("--plans", nargs="+", default=None, help="only these plans (labels as in the table, e.g. 'rlr h=2')")
    ap.add_argument("--lean-only", action="store_true", help="skip the runs without checkpointing (memory at SD size)")
    ap.add_argument("--no-agreement", action="store_true", help="skip the vmap/loop and bf16/fp32 checks")
    ap.add_argument("--out", default=None, help="markdown file (default: runs/sd_scale/<size>_<device>.md)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.size, args.device, args.T, args.repeats, args.compile = "tiny", "cpu", 6, 0, "no"
    if args.T < 4:
        ap.error("--T must be at least 4 (RLR h=3 needs a block of 3 steps after j = T/2)")
    out = args.out or os.path.join("runs", "sd_scale", f"{args.size}_{args.device}.md")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    global LATENT, GUIDANCE
    LATENT, GUIDANCE = args.latent, args.guidance
    setup = build(args.size, dtype, args.device)
    lines = [f"# Every plan at `{args.size}` size on {device_name(args.device)}", "",
             f"Written by `python benchmarks/sd_scale.py {' '.join(sys.argv[1:] if argv is None else argv)}`: {args.dtype} frozen "
             f"model, float32 LoRA (rank 4, attention), T = {args.T} {sampler_name(setup[0])} steps, "
             f"latent {latent_text(setup[0])}, CFG {args.guidance:g}, brightness reward on the "
             "decoded image. Saved = peak bytes autograd keeps (deterministic); reference = one step graph + "
             "T + 1 states; lean = every step with gradients and the VAE decoder's blocks checkpointed.", ""]
    if args.scaling:
        lines += ["## One step graph by latent size", "", "| latent | image tokens | one step graph | per image token |",
                  "|---|---:|---:|---:|"]
        for size in args.scaling:
            LATENT = size
            step, _ = step_graph_bytes(setup, args.T, args.batch[0])
            tokens = (size // getattr(setup[0].unet.config, "patch_size", 1)) ** 2
            lines.append(f"| {size}x{size} | {tokens} | {gib(step)} | {step / tokens / 2**20:.3f} MiB |")
            print(lines[-1], flush=True)
        LATENT = args.latent
        lines.append("")
    for batch in args.batch:
        step, state = step_graph_bytes(setup, args.T, batch)
        ref = step + (args.T + 1) * state
        mode = args.compile if args.compile != "no" and args.repeats else None
        floors = {"eager": rollout_seconds(setup, args.T, batch, args.repeats)}
        if mode:
            rollout_seconds(setup, args.T, batch, 1, mode)   # compiles
            floors["compiled"] = rollout_seconds(setup, args.T, batch, args.repeats, mode)
        lines += [f"## Batch {batch}", "",
                  f"One step graph {gib(step)}, one state {state / 2**20:.2f} MiB, reference {gib(ref)}."
                  + "".join(f" No-grad rollout, {k}: {v:.2f} s." for k, v in floors.items() if v), "",
                  "| plan | saved | lean saved | lean / reference | CUDA peak | lean CUDA peak | s / estimate | "
                  "lean s | lean s, compiled | x eager floor | lean compiled x compiled floor |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, plan, batching in plans(args.T):
            if args.plans and name not in args.plans:
                continue
            plain = (None, None, None) if args.lean_only else measure(setup, plan, batch, batching, False, args.repeats)
            lean = measure(setup, plan, batch, batching, True, args.repeats)
            fast = measure(setup, plan, batch, batching, True, args.repeats, mode)[2] if mode else None
            ratio = (lambda s, f: "-" if s is None or not f else f"{s / f:.2f}")
            lines.append(f"| {name} | {gib(plain[0])} | {gib(lean[0])} | {lean[0] / ref:.2f} | {gib(plain[1])} | "
                         f"{gib(lean[1])} | {sec(plain[2])} | {sec(lean[2])} | {sec(fast)} | "
                         f"{ratio(plain[2], floors['eager'])} | {ratio(fast, floors.get('compiled'))} |")
            print(lines[-1], flush=True)
        lines.append("")
    if not args.no_agreement:
        lines += ["## Agreement of per-sample RLR(h = 2) estimates, same noise", "",
                  "Largest |difference| over the largest |entry|, per part.", "", "| pair | FO | HO | ZO |",
                  "|---|---:|---:|---:|"]
        for name, parts in agreement(args.size, args.device, min(args.T, 10), 2).items():
            lines.append(f"| {name} | " + " | ".join(f"{parts[r]:.2e}" for r in ("FO", "HO", "ZO")) + " |")
    write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


def sampler_name(comp) -> str:
    """The sampler's name for the table's caption."""
    return "flow-matching Euler (SDE eta 0.7 where HO blocks end)" if comp.family != "sd" else "DDIM"


def latent_text(comp) -> str:
    """The latent shape the chains use, for the caption."""
    return "x".join(map(str, image_view(comp, LATENT).latent_shape))


def device_name(device: str) -> str:
    """The GPU's name, or "CPU"."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"


def gib(b) -> str:
    """Bytes as GiB or MiB ("-" for None)."""
    return "-" if b is None else f"{b / 2**30:.3f} GiB" if b >= 2**28 else f"{b / 2**20:.2f} MiB"


def sec(s) -> str:
    """Seconds with two decimals ("-" for None)."""
    return "-" if s is None else f"{s:.2f}"


if __name__ == "__main__":
    main()
