"""DiffEdit with DPM-Solver (or a --sampler of your choice): edit a photo from two prompts, or inpaint it inside a
mask you give.

    python scripts/diffedit_inpaint.py --init-img fruit.png --prompt "A bowl of fruits" --edit "A bowl of pears"
    python scripts/diffedit_inpaint.py --init-img room.png --mask window.png --edit "a window at night"

Writes OUTDIR/samples/NNNNN.png (the edit) and OUTDIR/masks/NNNNN.png (the mask used, white = edited).
"""

import argparse
import sys
from pathlib import Path

from ldm.cli import (ScriptParser, add_checkpoint_arguments, add_extra_arguments, add_sampler_arguments, check_fits,
                     check_lora_tags, check_one_process, check_values, clean_exit, finite_float, load_mask,
                     pipeline_from_args)
from ldm.editing.diffedit import ENCODE_TYPES, mask_image
from ldm.generation import Geometry, image_to_tensor, open_image
from ldm.models.diffusion.samplers import SIGMA_METHODS, check_sampler
from ldm.models.loading import load_config
from ldm.output import ImageWriter, check_writable, to_pil
from ldm.util import InputError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ScriptParser(__doc__)
    prompt, sampling = parser.group("prompt"), parser.group("sampling")
    prompt.add_argument("--init-img", type=str, required=False, help="path to the photo to edit")
    prompt.add_argument("--prompt", type=str, default="A bowl of fruits", help="what the photo shows (the source)")
    prompt.add_argument("--edit", type=str, default="A bowl of pears", help="what it should show (the target)")
    prompt.add_argument("--mask", type=str, default=None,
                        help="a mask image (white = edit); without it the mask is estimated from the two prompts")
    sampling.add_argument("--encode_ratio", type=finite_float, default=0.6,
                          help="how far to noise the photo before editing, in (0, 1]; higher changes more")
    sampling.add_argument("--ddim_steps", type=int, default=20, help="sampling steps")
    sampling.add_argument("--encode_type", type=str, default="stochastic", choices=ENCODE_TYPES,
                          help="stochastic: noise in one jump; deterministic: ODE inversion under the source prompt")
    sampling.add_argument("--scale", type=finite_float, default=7.5, help="classifier-free guidance scale")
    sampling.add_argument("--n_samples", type=int, default=1, help="how many edits to make")
    parser.group("output").add_argument("--outdir", type=str, default="outputs/diffedit-samples",
                                        help="dir to write results to")
    add_sampler_arguments(parser, "default: DPM-Solver++, the seed's; others decode a stochastic encoding")
    add_checkpoint_arguments(parser)
    add_extra_arguments(parser)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    check_values(args)
    check_lora_tags(args, [args.prompt, args.edit])
    if not args.init_img:
        raise InputError("--init-img is required: the photo to edit")
    if not 0.0 < args.encode_ratio <= 1.0:
        raise InputError(f"--encode_ratio must be in (0, 1], got {args.encode_ratio}")
    for flag in ("ddim_steps", "n_samples"):
        if getattr(args, flag) <= 0:
            raise InputError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    key, _ = check_sampler(args.sampler or "dpm_solver", args.schedule, eta_ancestral=args.eta_ancestral,
                           s_noise=args.s_noise)
    if key != "dpm_solver" and (key not in SIGMA_METHODS or args.encode_type != "stochastic"):
        raise InputError(f"--sampler {args.sampler} cannot decode DiffEdit's {args.encode_type} encoding: use "
                         "DPM-Solver, or a σ-space sampler ('DPM++ 2M Karras', 'Euler a', ...) with --encode_type "
                         "stochastic")
    if key == "dpm_solver" and args.ddim_steps < 2:
        raise InputError("--ddim_steps must be at least 2 (DPM-Solver++(2M))")
    check_writable(args.outdir, ("samples", "masks"))


@clean_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_one_process("diffedit_inpaint.py")
    check_args(args)
    config = load_config(args.config)
    picture = open_image(args.init_img, "--init-img")
    user_mask = load_mask(args.mask, (picture.height, picture.width)) if args.mask else None
    init_image = image_to_tensor(picture, Geometry.of(config).multiple, Path(args.init_img).name)
    image_size = tuple(init_image.shape[-2:])
    check_fits(args, config, args.n_samples, *image_size)
    pipeline = pipeline_from_args(args, config, args.sampler or "dpm_solver", f"{image_size[1]}×{image_size[0]}")

    images, flagged, latent_mask = pipeline.diffedit(
        init_image, args.prompt, args.edit, mask=user_mask, steps=args.ddim_steps, scale=args.scale,
        encode_ratio=args.encode_ratio, encode_type=args.encode_type, negative_prompt=args.negative_prompt,
        n_samples=args.n_samples, verbose=True)
    writer = ImageWriter(args.outdir)
    metadata = dict(prompt=args.prompt, edit=args.edit, negative_prompt=args.negative_prompt, seed=args.seed,
                    **pipeline.sampler_metadata(), steps=args.ddim_steps, scale=args.scale,
                    encode_ratio=args.encode_ratio,
                    encode_type=args.encode_type, size=f"{image_size[1]}x{image_size[0]}",
                    checkpoint=Path(args.ckpt).name, init_image=Path(args.init_img).name,
                    mask=Path(args.mask).name if args.mask else "estimated")
    mask = mask_image(latent_mask, image_size)
    for image in to_pil(images):
        number = max(writer.next_number("samples"), writer.next_number("masks"))
        sample = writer.save(image, "samples", metadata=metadata, number=number)
        writer.save(mask, "masks", metadata=metadata, number=int(sample.stem), watermark=False)
    writer.report()
    if flagged:
        print(f"the safety checker replaced {flagged} of {len(images)} images with a placeholder", file=sys.stderr)
    print(f"Your edits and their masks are ready and waiting for you here:\n{args.outdir}\nEnjoy.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
