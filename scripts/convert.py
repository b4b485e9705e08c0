"""Move a model between tools: write any checkpoint this port loads (a .ckpt/.safetensors, a diffusers folder, a
Hugging Face cache snapshot) as a diffusers folder or as an original-layout .safetensors, optionally in float16
and optionally merged with a second checkpoint of the same model.

    python scripts/convert.py --ckpt models/ldm/stable-diffusion-v1/model.ckpt --diffusers outputs/sd-v1-diffusers
    python scripts/convert.py --ckpt ~/.cache/huggingface/hub/models--org--model --original model.safetensors --half
    python scripts/convert.py --ckpt a.safetensors --merge b.safetensors --merge_ratio 0.3 --original ab.safetensors

The diffusers folder is written by diffusers' own ``save_pretrained`` from our weights converted by diffusers'
single-file converters; nothing existing is overwritten.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.cli import ScriptParser, add_checkpoint_arguments, clean_exit, finite_float
from ldm.models.loading import load_config, load_model, load_vae, merge_weighted_sum
from ldm.testing.diffusers_interop import diffusers_pipeline
from ldm.util import InputError


def parse_args(argv: list[str] | None):
    parser = ScriptParser(__doc__)
    add_checkpoint_arguments(parser)
    model = parser.group("model")
    model.add_argument("--merge", type=str, default=None, metavar="CKPT",
                       help="a second checkpoint of the same config, merged in by weighted sum (AUTOMATIC1111's "
                            "checkpoint merger): (1 - M)·ckpt + M·merge")
    model.add_argument("--merge_ratio", type=finite_float, default=0.5, metavar="M",
                       help="the second checkpoint's share")
    output = parser.group("output")
    output.add_argument("--diffusers", type=Path, default=None, metavar="DIR", help="write a diffusers model folder")
    output.add_argument("--original", type=Path, default=None, metavar="FILE",
                        help="write an original-layout .safetensors")
    output.add_argument("--half", action="store_true", help="store float16 weights")
    return parser.parse_args(argv)


@clean_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (args.diffusers is None) == (args.original is None):
        raise InputError("give one of --diffusers DIR or --original FILE")
    target = args.diffusers or args.original
    if target.exists():
        raise InputError(f"{target} exists; refusing to overwrite it")
    if args.original is not None and args.original.suffix != ".safetensors":
        raise InputError(f"--original {args.original} must end in .safetensors")
    if not 0.0 <= args.merge_ratio <= 1.0:
        raise InputError(f"--merge_ratio {args.merge_ratio} is outside [0, 1]")
    config = load_config(args.config)
    dtype = torch.float16 if args.half else torch.float32
    model = load_model(config, args.ckpt, dtype=dtype, ema=args.ema)
    if args.merge is not None:
        merge_weighted_sum(model, load_model(config, args.merge, dtype=dtype, ema=args.ema), args.merge_ratio)
    if args.vae:
        load_vae(model, args.vae)  # baked in: the written model carries the separate VAE
    if args.original is not None:
        args.original.parent.mkdir(parents=True, exist_ok=True)
        save_file({key: value.contiguous() for key, value in model.state_dict().items()
                   if not key.endswith("position_ids")}, args.original)
    else:
        pipeline = diffusers_pipeline(model.float(), model.source_config)
        pipeline.to(torch.float16 if args.half else torch.float32).save_pretrained(args.diffusers)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
