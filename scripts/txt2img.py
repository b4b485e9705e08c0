"""Text to image with Stable Diffusion v1: the CompVis script's flags, defaults and outputs.

    python scripts/txt2img.py --prompt "a photograph of an astronaut riding a horse" --dpm_solver --ddim_steps 25
    python scripts/txt2img.py --from-file prompts.txt --n_samples 4 --seed -1 --outdir outputs/mine
    torchrun --nproc_per_node 8 scripts/txt2img.py --from-file captions.txt --n_samples 8 --outdir outputs/fid
"""

import argparse
import logging
import sys
from pathlib import Path

from ldm.cli import (ScriptParser, add_extra_arguments, add_model_arguments, add_prompt_and_output_arguments,
                     add_run_arguments, add_size_arguments, apply_infotext, check_common, check_fits, check_run_flags,
                     clean_exit, file_metadata, pipeline_from_args, prompt_batches, prompt_source, run_batches,
                     run_per_image, sampler_name)
from ldm.distributed import process_group
from ldm.generation import Geometry
from ldm.models.loading import load_config
from ldm.output import RunOutput
from ldm.util import InputError

logger = logging.getLogger("ldm.txt2img")

LAION400M = dict(config="configs/latent-diffusion/txt2img-1p4B-eval.yaml", ckpt="models/ldm/text2img-large/model.ckpt",
                 outdir="outputs/txt2img-samples-laion400m")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ScriptParser(__doc__)
    add_prompt_and_output_arguments(parser, outdir="outputs/txt2img-samples")
    parser.group("model").add_argument("--laion400m", action="store_true", help="uses the LAION400M model")
    parser.group("sampling").add_argument("--fixed_code", action="store_true",
                                          help="if enabled, uses the same starting code across samples")
    add_model_arguments(parser, n_iter=2, n_samples=3, scale=7.5)
    add_size_arguments(parser)
    parser.group("output").add_argument("--H", type=int, default=None,
                                        help="image height, in pixel space (default: the config's native size, 512 "
                                             "for SD v1, 768 for v2-inference-v)")
    parser.group("output").add_argument("--W", type=int, default=None, help="image width, in pixel space (default: "
                                                                            "as --H)")
    add_extra_arguments(parser)
    add_run_arguments(parser)
    parser.group("prompt").add_argument("--from-png", type=str, default=None, metavar="FILE",
                                        help="draw again the picture FILE was drawn with: its AUTOMATIC1111 "
                                             "'parameters' text sets prompt, negative prompt, seed, steps, scale, "
                                             "size, sampler, eta and CLIP skip")
    args = parser.parse_args(argv)
    if args.from_png:
        apply_infotext(args, args.from_png)
    if args.laion400m:
        logger.info("Falling back to LAION 400M model...")
        vars(args).update(LAION400M)
    return args


@clean_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with process_group() as process:
        draw(args, process)
    return 0


def draw(args: argparse.Namespace, process) -> None:
    check_common(args)
    check_run_flags(args, process)
    if args.laion400m and not Path(args.config).is_file():
        raise InputError("the LAION-400M model (--laion400m) is not supported by this port: its config "
                         f"{args.config} and BERT text encoder are not included")
    per_image = args.seed_mode == "per_image"
    source, batches = (prompt_source(args), None) if per_image else (None, prompt_batches(args))
    config = load_config(args.config)
    geometry = Geometry.of(config)
    args.H, args.W = (geometry.native_size if side is None else side for side in (args.H, args.W))
    geometry.check(args.H, args.W, args.C, args.f)
    check_fits(args, config, args.n_samples, args.H, args.W)
    pipeline = pipeline_from_args(args, config, sampler_name(args), f"{args.W}×{args.H}")
    metadata = dict(negative_prompt=args.negative_prompt, seed=args.seed, **pipeline.sampler_metadata(),
                    steps=args.ddim_steps, scale=args.scale, eta=args.ddim_eta, size=f"{args.W}x{args.H}",
                    checkpoint=Path(args.ckpt).name, clip_skip=args.clip_skip) | file_metadata(args)

    def images(prompts, generator=None, x_T=None):
        return pipeline.txt2img(prompts, steps=args.ddim_steps, scale=args.scale, negative_prompt=args.negative_prompt,
                                eta=args.ddim_eta, height=args.H, width=args.W, x_T=x_T, generator=generator,
                                verbose=process.is_main)

    if per_image:
        run_per_image(args, process, pipeline, metadata, source, images)
        return
    x_T = pipeline.initial_noise(args.n_samples, args.H, args.W) if args.fixed_code else None
    output = RunOutput(args.outdir, metadata, args.skip_save, args.skip_grid)
    run_batches(args, batches, output, lambda prompts: images(prompts, x_T=x_T))


if __name__ == "__main__":
    sys.exit(main())
