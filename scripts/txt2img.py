"""Text to image with Stable Diffusion v1: the CompVis script's flags, defaults and outputs.

    python scripts/txt2img.py --prompt "a photograph of an astronaut riding a horse" --dpm_solver --ddim_steps 25
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldm.cli import (add_extra_arguments, add_model_arguments, add_prompt_and_output_arguments, check_common,
                     clean_exit, prompt_batches, sampler_name)
from ldm.generation import Geometry, Pipeline, load_safety_checker, resolve_device
from ldm.models.loading import load_config
from ldm.output import ImageWriter, image_grid, to_pil
from ldm.util import InputError, seed_everything

logger = logging.getLogger("ldm.txt2img")

LAION400M = dict(config="configs/latent-diffusion/txt2img-1p4B-eval.yaml", ckpt="models/ldm/text2img-large/model.ckpt",
                 outdir="outputs/txt2img-samples-laion400m")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prompt_and_output_arguments(parser, outdir="outputs/txt2img-samples")
    parser.add_argument("--laion400m", action="store_true", help="uses the LAION400M model")
    parser.add_argument("--fixed_code", action="store_true", help="if enabled, uses the same starting code across "
                        "samples")
    add_model_arguments(parser, n_iter=2, n_samples=3, scale=7.5)
    parser.add_argument("--H", type=int, default=512, help="image height, in pixel space")
    parser.add_argument("--W", type=int, default=512, help="image width, in pixel space")
    parser.add_argument("--C", type=int, default=4, help="latent channels")
    parser.add_argument("--f", type=int, default=8, help="downsampling factor")
    add_extra_arguments(parser)
    args = parser.parse_args(argv)
    if args.laion400m:
        logger.info("Falling back to LAION 400M model...")
        vars(args).update(LAION400M)
    return args


@clean_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_common(args)
    if args.laion400m and not Path(args.config).is_file():
        raise InputError("the LAION-400M model (--laion400m) is not supported by this port: its config "
                         f"{args.config} and BERT text encoder are not included")
    batches = prompt_batches(args)
    config = load_config(args.config)
    geometry = Geometry.of(config)
    geometry.check(args.H, args.W, args.C, args.f)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    safety_checker = load_safety_checker(config, args.safety_checker, args.no_safety_checker, device)
    pipeline = Pipeline.load(config, args.ckpt, device, args.precision, sampler_name(args), safety_checker)

    shape = geometry.latent_shape(args.H, args.W)
    start_code = torch.randn((args.n_samples, *shape), device=device) if args.fixed_code else None
    writer = ImageWriter(args.outdir)
    metadata = dict(negative_prompt=args.negative_prompt, seed=args.seed, sampler=pipeline.sampler_name,
                    steps=args.ddim_steps, scale=args.scale, size=f"{args.W}x{args.H}", checkpoint=Path(args.ckpt).name)
    all_images, flagged, saved = [], 0, 0
    with pipeline.scope(), tqdm(total=args.n_iter * len(batches), desc="Sampling", unit="batch") as progress:
        for _ in range(args.n_iter):
            for prompts in batches:
                c, uc = pipeline.conditioning(prompts, args.negative_prompt, args.scale)
                x_T = None if start_code is None else start_code[:len(prompts)]
                latents, _ = pipeline.sampler.sample(S=args.ddim_steps, batch_size=len(prompts), shape=shape,
                                                     conditioning=c, verbose=False,
                                                     unconditional_guidance_scale=args.scale,
                                                     unconditional_conditioning=uc, eta=args.ddim_eta, x_T=x_T)
                images, replaced = pipeline.check_safety(pipeline.decode(latents))
                flagged += replaced
                if not args.skip_save:
                    for prompt, image in zip(prompts, to_pil(images)):
                        writer.save(image, "samples", metadata=dict(metadata, prompt=prompt))
                        saved += 1
                if not args.skip_grid:
                    all_images.append(images)
                progress.update()
    if not args.skip_grid:
        grid = image_grid(torch.cat(all_images), args.n_rows or args.n_samples)
        prompts = sorted({p for batch in batches for p in batch})
        writer.save(grid, "", prefix="grid-", digits=4,
                    metadata=dict(metadata, prompt=prompts[0] if len(prompts) == 1 else json.dumps(prompts)))
    writer.report()
    if flagged:
        logger.warning("the safety checker replaced %d of %d images with a placeholder", flagged,
                       args.n_iter * sum(map(len, batches)))
    print(f"Your samples are ready and waiting for you here:\n{args.outdir}\n({saved} samples"
          f"{'' if args.skip_grid else ' and a grid'})\nEnjoy.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
