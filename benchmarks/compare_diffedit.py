"""Our DiffEdit against diffusers' StableDiffusionDiffEditPipeline on the same weights (tiny config by default).

Both get identical weights (ours converted with diffusers' single-file converters) and the same photo. Prints
each side's defaults in use, the mask coverage and their overlap (IoU), model calls, and the seconds taken.
With random tiny weights the pictures mean nothing; the masks and the costs do.

    python benchmarks/compare_diffedit.py [--config ... --ckpt ...]
"""

import argparse
import time
from pathlib import Path

import torch
import yaml
from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline
from PIL import Image

from ldm.editing.diffedit import estimate_mask
from ldm.generation import Geometry, Pipeline, encode_images, load_image
from ldm.models.loading import build_model, load_config, load_model
from ldm.modules.encoders.modules import clip_tokenizer
from ldm.testing.diffusers_interop import diffusers_unet, diffusers_vae, transformers_text_encoder
from ldm.util import randomize_parameters_

ROOT = Path(__file__).resolve().parents[1]


def diffusers_pipeline(model, original_config: dict) -> StableDiffusionDiffEditPipeline:
    state_dict = model.state_dict()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = 77
    pipeline = StableDiffusionDiffEditPipeline(
        vae=diffusers_vae(state_dict, original_config), unet=diffusers_unet(state_dict, original_config),
        text_encoder=transformers_text_encoder(state_dict, model.cond_stage_model.transformer.text_model.config),
        tokenizer=tokenizer, scheduler=scheduler, inverse_scheduler=DDIMInverseScheduler.from_config(scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/stable-diffusion/v1-tiny.yaml"))
    parser.add_argument("--ckpt", default=None, help="checkpoint; default: random weights for the config")
    parser.add_argument("--image", default=str(ROOT / "assets/diffedit-input.png"))
    parser.add_argument("--source", default="A cup of coffee")
    parser.add_argument("--target", default="A cup of green tea")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = (load_model(args.config, args.ckpt) if args.ckpt else randomize_parameters_(build_model(args.config))).eval()
    pipe = diffusers_pipeline(model, yaml.safe_load(Path(args.config).read_text()))
    pipeline = Pipeline(model, Geometry.of(load_config(args.config)), sampler="dpm_solver")
    image = load_image(args.image, pipeline.geometry.multiple)
    pil = Image.open(args.image).convert("RGB").resize(tuple(reversed(image.shape[-2:])))
    ours_calls, theirs_calls = count_calls(model.model.diffusion_model), count_calls(pipe.unet)

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    latent = encode_images(model, image, generator)
    src, dst = (model.get_learned_conditioning([p]) for p in (args.source, args.target))
    ours_mask = estimate_mask(pipeline.sampler, latent, src, dst, generator=generator).bool()
    mask_calls = ours_calls[0]
    ours_edit = pipeline.diffedit(image, args.source, args.target, mask=ours_mask.float(), generator=generator)
    ours_seconds = time.perf_counter() - start

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    theirs_mask = pipe.generate_mask(image=pil, source_prompt=args.source, target_prompt=args.target,
                                     generator=generator)
    their_mask_calls = theirs_calls[0]
    inverted = pipe.invert(prompt=args.source, image=pil, generator=generator).latents
    pipe(prompt=args.target, mask_image=theirs_mask, image_latents=inverted, negative_prompt=args.source,
         generator=generator, output_type="pt")
    theirs_seconds = time.perf_counter() - start
    theirs_mask = torch.from_numpy(theirs_mask[0]).bool()

    union = (ours_mask | theirs_mask).sum().item()
    print("| | ours (seed defaults) | diffusers StableDiffusionDiffEditPipeline defaults |")
    print("|---|---|---|")
    print("| mask | 3 noisings at ratio 0.5, no guidance, clamp 3.5 × mean | 10 noisings at strength 0.5, "
          "guidance 7.5 on both prompts, clamp 3.0 × mean |")
    print("| encoding | stochastic jump to ratio 0.6 (or DPM-Solver++ inversion) | DDIM inversion to strength 0.8, "
          "50 steps |")
    print("| editing | DPM-Solver++(2M), 20 steps, background re-pinned every step | DDIM, 50 × 0.8 = 40 steps, "
          "background from the inverted latents |")
    print(f"| mask coverage | {ours_mask.float().mean():.1%} | {theirs_mask.float().mean():.1%} |")
    print(f"| mask IoU | {(ours_mask & theirs_mask).sum().item() / max(union, 1):.2f} | |")
    print(f"| UNet calls: mask / total | {mask_calls} / {ours_calls[0]} | {their_mask_calls} / {theirs_calls[0]} |")
    print(f"| seconds (this machine) | {ours_seconds:.1f} | {theirs_seconds:.1f} |")
    print(f"edited image shape: {tuple(ours_edit.images.shape)}")


if __name__ == "__main__":
    main()
