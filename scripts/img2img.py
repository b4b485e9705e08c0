"""Image to image with Stable Diffusion v1: the CompVis script's flags and defaults, plus PLMS and DPM-Solver.

    python scripts/img2img.py --prompt "A fantasy landscape, trending on artstation" --init-img sketch.jpg --strength 0.8
"""

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldm.cli import (acceleration_from_args, add_extra_arguments, add_model_arguments, add_prompt_and_output_arguments,
                     check_common, clean_exit, prompt_batches, sampler_name)
from ldm.generation import Geometry, Pipeline, load_image, load_safety_checker, resolve_device
from ldm.models.loading import load_config
from ldm.output import RunOutput
from ldm.util import InputError, seed_everything


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prompt_and_output_arguments(parser, outdir="outputs/img2img-samples")
    parser.add_argument("--init-img", type=str, nargs="?", help="path to the input image")
    parser.add_argument("--fixed_code", action="store_true",
                        help="if enabled, uses the same noise for every batch")
    add_model_arguments(parser, n_iter=1, n_samples=2, scale=5.0)
    parser.add_argument("--C", type=int, default=None, help="latent channels (default: the config's, 4 for SD v1)")
    parser.add_argument("--f", type=int, default=None, help="downsampling factor (default: the config's, 8 for SD v1)")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="strength for noising/unnoising. 1.0 corresponds to full destruction of information "
                             "in init image")
    add_extra_arguments(parser)
    return parser.parse_args(argv)


@clean_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_common(args)
    if not args.init_img:
        raise InputError("--init-img is required: the image to start from")
    if not 0.0 <= args.strength <= 1.0:
        raise InputError(f"--strength must be between 0 and 1, got {args.strength}")
    batches = prompt_batches(args)
    config = load_config(args.config)
    geometry = Geometry.of(config)
    init_image = load_image(args.init_img, geometry.multiple)
    geometry.check(*init_image.shape[-2:], args.C, args.f)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    safety_checker = load_safety_checker(config, args.safety_checker, args.no_safety_checker, device)
    pipeline = Pipeline.load(config, args.ckpt, device, args.precision, sampler_name(args), safety_checker,
                             acceleration_from_args(args, device))

    height, width = init_image.shape[-2:]
    metadata = dict(negative_prompt=args.negative_prompt, seed=args.seed, sampler=pipeline.sampler_name,
                    steps=args.ddim_steps, scale=args.scale, strength=args.strength, size=f"{width}x{height}",
                    checkpoint=Path(args.ckpt).name, init_image=Path(args.init_img).name)
    output = RunOutput(args.outdir, metadata, args.skip_save, args.skip_grid)
    with pipeline.scope(), tqdm(total=args.n_iter * len(batches), desc="Sampling", unit="batch") as progress:
        init_latent = pipeline.encode(init_image.repeat(args.n_samples, 1, 1, 1))
        noise = torch.randn_like(init_latent) if args.fixed_code else None
        for _ in range(args.n_iter):
            for prompts in batches:
                c, uc = pipeline.conditioning(prompts, args.negative_prompt, args.scale)
                n = len(prompts)
                latents = pipeline.sampler.img2img(init_latent[:n], args.strength, args.ddim_steps, c,
                                                   unconditional_guidance_scale=args.scale,
                                                   unconditional_conditioning=uc, eta=args.ddim_eta,
                                                   noise=None if noise is None else noise[:n], verbose=False)
                output.add(*pipeline.to_images(latents), prompts)
                progress.update()
    print(output.close(args.n_rows or args.n_samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
