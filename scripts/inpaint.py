r"""Inpainting with Stable Diffusion: repaint the white part of a mask, keep the rest of the image, with any sampler.

    python scripts/inpaint.py --init-img photo.png --mask mask.png --prompt "a vase of sunflowers on the table"
    python scripts/inpaint.py --init-img photo.png --mask mask.png --prompt "a cat" --config \
        configs/stable-diffusion/v1-inference.yaml --ckpt sd-v1-4.ckpt --sampler "DPM++ 2M Karras" --ddim_steps 25

The default config is RunwayML's inpainting model (v1-inpainting-inference.yaml), which sees the mask and the
masked image; a text-to-image checkpoint with its own config inpaints too, by keeping the unmasked region pinned
(ldm.editing.inpainting). Writes OUTDIR/samples/NNNNN.png and a grid, like txt2img.
"""

import argparse
import sys
from pathlib import Path

from ldm.cli import (ScriptParser, add_extra_arguments, add_model_arguments, add_prompt_and_output_arguments,
                     add_size_arguments, check_common, check_fits, check_one_process, clean_exit, file_metadata,
                     finite_float, load_mask, pipeline_from_args, prompt_batches, run_batches, sampler_name)
from ldm.generation import Geometry, image_to_tensor, open_image
from ldm.models.loading import load_config
from ldm.output import RunOutput
from ldm.util import InputError

DEFAULT_CONFIG = "configs/stable-diffusion/v1-inpainting-inference.yaml"
DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/sd-v1-5-inpainting.ckpt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ScriptParser(__doc__)
    add_prompt_and_output_arguments(parser, outdir="outputs/inpainting-samples")
    prompt, sampling = parser.group("prompt"), parser.group("sampling")
    prompt.add_argument("--init-img", type=str, nargs="?", help="path to the image to inpaint")
    prompt.add_argument("--mask", type=str, default=None,
                        help="the mask image (white = repaint, black = keep), with the image's aspect ratio")
    add_model_arguments(parser, n_iter=1, n_samples=1, scale=7.5)
    add_size_arguments(parser)
    sampling.add_argument("--strength", type=finite_float, default=1.0,
                          help="how much of the masked region to redraw, in (0, 1]: 1 starts it from pure noise, "
                               "lower values from the image noised that far (as img2img)")
    add_extra_arguments(parser)
    parser.set_defaults(config=DEFAULT_CONFIG, ckpt=DEFAULT_CKPT)
    return parser.parse_args(argv)


@clean_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_one_process("inpaint.py")
    check_common(args)
    if not args.init_img or not args.mask:
        raise InputError("--init-img and --mask are required: the image, and what to repaint in it (white)")
    if not 0.0 < args.strength <= 1.0:
        raise InputError(f"--strength must be in (0, 1], got {args.strength}")
    batches = prompt_batches(args)
    config = load_config(args.config)
    geometry = Geometry.of(config)
    picture = open_image(args.init_img, "--init-img")
    mask = load_mask(args.mask, (picture.height, picture.width))  # drawn on the picture as it is
    init_image = image_to_tensor(picture, geometry.multiple, Path(args.init_img).name)
    height, width = init_image.shape[-2:]
    geometry.check(height, width, args.C, args.f)
    check_fits(args, config, args.n_samples, height, width)
    pipeline = pipeline_from_args(args, config, sampler_name(args), f"{width}×{height}")
    metadata = dict(negative_prompt=args.negative_prompt, seed=args.seed, **pipeline.sampler_metadata(),
                    steps=args.ddim_steps, scale=args.scale, eta=args.ddim_eta, strength=args.strength,
                    size=f"{width}x{height}", checkpoint=Path(args.ckpt).name, init_image=Path(args.init_img).name,
                    mask=Path(args.mask).name, clip_skip=args.clip_skip)
    output = RunOutput(args.outdir, metadata | file_metadata(args), args.skip_save, args.skip_grid)
    run_batches(args, batches, output, lambda prompts: pipeline.inpaint(
        init_image, mask, prompts, steps=args.ddim_steps, scale=args.scale, negative_prompt=args.negative_prompt,
        strength=args.strength, eta=args.ddim_eta, verbose=True)[:2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
