r"""Image to image with Stable Diffusion v1: the CompVis script's flags and defaults, plus PLMS and DPM-Solver.

    python scripts/img2img.py --prompt "A fantasy landscape, trending on artstation" --init-img sketch.jpg \
        --strength 0.8
    python scripts/img2img.py --init-img photo.png --from-file prompts.txt --dpm_solver --ddim_steps 25
"""

import argparse
import sys
from pathlib import Path

import torch

from ldm.cli import (ScriptParser, add_extra_arguments, add_model_arguments, add_prompt_and_output_arguments,
                     add_size_arguments, check_common, check_fits, check_one_process, clean_exit, file_metadata,
                     finite_float, pipeline_from_args, prompt_batches, run_batches, sampler_name)
from ldm.generation import Geometry, load_image
from ldm.models.loading import load_config
from ldm.output import RunOutput
from ldm.util import InputError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ScriptParser(__doc__)
    add_prompt_and_output_arguments(parser, outdir="outputs/img2img-samples")
    parser.group("prompt").add_argument("--init-img", type=str, nargs="?", help="path to the input image")
    parser.group("sampling").add_argument("--fixed_code", action="store_true",
                                          help="if enabled, uses the same noise for every batch")
    add_model_arguments(parser, n_iter=1, n_samples=2, scale=5.0)
    add_size_arguments(parser)
    parser.group("sampling").add_argument("--strength", type=finite_float, default=0.75,
                                          help="strength for noising/unnoising. 1.0 corresponds to full destruction "
                                               "of information in init image")
    add_extra_arguments(parser)
    return parser.parse_args(argv)


@clean_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_one_process("img2img.py")
    check_common(args)
    if not args.init_img:
        raise InputError("--init-img is required: the image to start from")
    if not 0.0 <= args.strength <= 1.0:
        raise InputError(f"--strength must be between 0 and 1, got {args.strength}")
    batches = prompt_batches(args)
    config = load_config(args.config)
    geometry = Geometry.of(config)
    init_image = load_image(args.init_img, geometry.multiple)
    height, width = init_image.shape[-2:]
    geometry.check(height, width, args.C, args.f)
    check_fits(args, config, args.n_samples, height, width)
    pipeline = pipeline_from_args(args, config, sampler_name(args), f"{width}×{height}")

    # One posterior sample for the whole run, and with --fixed_code one noise, as the original.
    init = pipeline.encode(init_image.repeat(args.n_samples, 1, 1, 1))
    noise = torch.randn_like(init.latents) if args.fixed_code else None
    metadata = dict(negative_prompt=args.negative_prompt, seed=args.seed, **pipeline.sampler_metadata(),
                    steps=args.ddim_steps, scale=args.scale, eta=args.ddim_eta, strength=args.strength,
                    size=f"{width}x{height}", checkpoint=Path(args.ckpt).name, init_image=Path(args.init_img).name,
                    clip_skip=args.clip_skip)
    output = RunOutput(args.outdir, metadata | file_metadata(args), args.skip_save, args.skip_grid)
    run_batches(args, batches, output, lambda prompts: pipeline.img2img(
        init, args.strength, prompts, steps=args.ddim_steps, scale=args.scale, negative_prompt=args.negative_prompt,
        eta=args.ddim_eta, noise=noise, verbose=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
