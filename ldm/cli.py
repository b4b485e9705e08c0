"""Command-line plumbing shared by the scripts: the original's flags, checks on them, the pipeline they ask for,
the batch loop, and clean exits.

Anything a user can get wrong raises :class:`ldm.util.InputError` (a file, a config) or
:class:`ldm.util.ParameterError` (a value, named as the library names it); :func:`clean_exit` turns either into
one line on stderr, naming the flag, and exit code 2, before anything is written.
"""

import argparse
import functools
import hashlib
import logging
import math
import secrets
import sys
from pathlib import Path
from typing import Callable, Iterator

from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from ldm.distributed import Process, launched, process_from_environment
from ldm.generation import (DEVICES, PRECISIONS, Generated, Pipeline, activation_bytes, available_bytes, open_image,
                            resolve_device, resolve_precision)
from ldm.models.acceleration import BACKENDS, Acceleration
from ldm.models.diffusion.samplers import SAMPLERS, check_sampler, resolve_sampler, resolve_schedule
from ldm.models.diffusion.sampling_util import ImageGenerators
from ldm.models.lora import find_lora, take_lora_tags
from ldm.modules.encoders.modules import EMPHASIS_MODES
from ldm.output import A1111_SAMPLERS, RunOutput, check_writable, parse_infotext
from ldm.sharding import ShardedRun, work_items
from ldm.util import InputError, ParameterError, Problems, check_seed, seed_everything

logger = logging.getLogger("ldm")

DEFAULT_PROMPT = "a painting of a virus monster playing guitar"
SEED_MODES = ("original", "per_image")
NOISE_DEVICES = ("cpu", "model")
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEFAULT_EMBEDDINGS = "models/embeddings"
DEFAULT_LORA_DIR = "models/lora"

# The library's parameter names → the flags that set them (the same in every script).
PARAMETER_FLAGS = {
    "prompts": "--prompt", "steps": "--ddim_steps", "scale": "--scale", "eta": "--ddim_eta", "height": "--H",
    "width": "--W", "latent_channels": "--C", "factor": "--f", "strength": "--strength", "seed": "--seed",
    "device": "--device", "precision": "--precision", "safety_checker": "--safety_checker",
    "cuda_graph": "--cuda_graph", "compile": "--compile", "attention_slicing": "--attention_slicing",
    "images": "--init-img", "encode_ratio": "--encode_ratio", "encode_type": "--encode_type",
    "n_samples": "--n_samples", "noise": "--fixed_code", "x_T": "--fixed_code", "outdir": "--outdir",
    "clip_skip": "--clip_skip", "emphasis": "--emphasis", "sampler": "--sampler", "schedule": "--schedule",
    "eta_ancestral": "--eta_ancestral", "s_noise": "--s_noise", "backend": "--backend",
}
# What the command line adds to a parameter's message.
FLAG_HINTS = {"safety_checker": "with --no_safety_checker"}


def flag_message(error: ParameterError) -> str:
    """The library's message with the flag's name in place of the parameter's."""
    message = f"{PARAMETER_FLAGS.get(error.parameter, error.parameter)} {error.problem}"
    return f"{message} {FLAG_HINTS[error.parameter]}" if error.parameter in FLAG_HINTS else message


def clean_exit(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Run ``main`` with logging set up; user errors exit 2 with one line, Ctrl-C exits 130."""
    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("ldm").setLevel(logging.INFO)
        try:
            return main(argv)
        except Problems as problems:
            print("error: " + "; ".join(flag_message(error) if isinstance(error, ParameterError) else str(error)
                                        for error in problems.errors), file=sys.stderr)
            return 2
        except InputError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except ParameterError as error:
            print(f"error: {flag_message(error)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; files already written are complete, nothing half-written was left", file=sys.stderr)
            return 130
    return wrapper


GROUPS = {"prompt": "prompt", "sampling": "sampling", "model": "model and device", "output": "output",
          "speed": "speed and memory (results change by rounding only)", "safety": "safety"}
MAX_SCALE = 100.0  # guidance beyond this only saturates the picture; 1e30 would make it black


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help (not for switches that are off), the description (a script's docstring,
    with its examples) kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, ""):
            return action.help
        return super()._get_help_string(action)


class ScriptParser(argparse.ArgumentParser):
    """The scripts' parser: flags in groups, defaults in --help, and a bad flag as one line (exit 2) like every
    other user error."""

    def __init__(self, description: str):
        super().__init__(description=description, formatter_class=HelpFormatter)
        self.groups = {name: self.add_argument_group(title) for name, title in GROUPS.items()}

    def group(self, name: str) -> argparse._ArgumentGroup:
        return self.groups[name]

    def error(self, message: str):
        raise InputError(message)


def finite_float(text: str) -> float:
    """A float flag's type: NaN and infinities are refused (they would draw black pictures)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def add_prompt_and_output_arguments(parser: ScriptParser, outdir: str) -> None:
    prompt, output, sampling = parser.group("prompt"), parser.group("output"), parser.group("sampling")
    prompt.add_argument("--prompt", type=str, nargs="?", default=DEFAULT_PROMPT, help="the prompt to render")
    output.add_argument("--outdir", type=str, nargs="?", default=outdir, help="dir to write results to")
    output.add_argument("--skip_grid", action="store_true",
                        help="do not save a grid, only individual samples. Helpful when evaluating lots of samples")
    output.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    sampling.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps")
    sampling.add_argument("--plms", action="store_true", help="use plms sampling")
    sampling.add_argument("--dpm_solver", action="store_true", help="use dpm_solver sampling (wins over --plms)")
    add_sampler_arguments(parser, "default: --dpm_solver, --plms or DDIM, as the original")


def add_sampler_arguments(parser: ScriptParser, default: str) -> None:
    """--sampler and its options; ``default`` says what runs without --sampler."""
    sampling = parser.group("sampling")
    sampling.add_argument("--sampler", type=str, default=None, metavar="NAME",
                          help="a sampler by its A1111 or ComfyUI name ('Euler a', 'DPM++ 2M Karras', dpmpp_2m_sde, "
                               f"UniPC, ...; see the README); {default}")
    sampling.add_argument("--schedule", type=str, default=None, metavar="NAME",
                          help="the noise schedule of a --sampler: Normal, Karras, Exponential, 'SGM Uniform', "
                               "Simple, 'Align Your Steps', Beta (default: A1111's for the sampler)")
    sampling.add_argument("--eta_ancestral", type=finite_float, default=None, metavar="ETA",
                          help="noise level of ancestral and SDE samplers, 0 to 1 (default 1)")
    sampling.add_argument("--s_noise", type=finite_float, default=1.0,
                          help="a factor on the noise of ancestral and SDE samplers")


def add_model_arguments(parser: ScriptParser, n_iter: int, n_samples: int, scale: float) -> None:
    sampling = parser.group("sampling")
    sampling.add_argument("--ddim_eta", type=finite_float, default=0.0,
                          help="ddim eta (eta=0.0 corresponds to deterministic sampling), in [0, 1]")
    sampling.add_argument("--n_iter", type=int, default=n_iter, help="sample this often")
    sampling.add_argument("--n_samples", type=int, default=n_samples,
                          help="how many samples to produce for each given prompt. A.k.a. batch size")
    parser.group("output").add_argument("--n_rows", type=int, default=0,
                                        help="images per grid row (0: n_samples)")
    sampling.add_argument("--scale", type=finite_float, default=scale,
                          help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - "
                               f"eps(x, empty)), at most {MAX_SCALE:g}")
    parser.group("prompt").add_argument("--from-file", type=str,
                                        help="if specified, load prompts from this file, one per line")
    add_checkpoint_arguments(parser)


def add_size_arguments(parser: ScriptParser) -> None:
    model = parser.group("model")
    model.add_argument("--C", type=int, default=None, help="latent channels (default: the config's, 4 for SD v1)")
    model.add_argument("--f", type=int, default=None, help="downsampling factor (default: the config's, 8 for SD v1)")


def add_checkpoint_arguments(parser: ScriptParser) -> None:
    model = parser.group("model")
    model.add_argument("--config", type=str, default=DEFAULT_CONFIG, help="path to config which constructs model")
    model.add_argument("--ckpt", type=str, default=DEFAULT_CKPT, help="path to checkpoint of model")
    model.add_argument("--ema", action="store_true",
                       help="a full checkpoint (with model_ema.*): sample with its EMA weights")
    model.add_argument("--vae", type=str, default=None, metavar="FILE",
                       help="a separate VAE (.ckpt or .safetensors, e.g. vae-ft-mse-840000-ema-pruned) instead of the "
                            "checkpoint's autoencoder")
    parser.group("sampling").add_argument("--seed", type=int, default=42,
                                          help="the seed (for reproducible sampling); -1 picks a random one and "
                                               "reports it")
    model.add_argument("--precision", type=str, choices=PRECISIONS, default="auto",
                       help="evaluate at this precision: auto (fp16 on GPUs, full on the CPU), full (float32), "
                            "autocast (float32 weights, float16 autocast on GPUs: the original's default), fp16 or "
                            "bf16 weights")


def add_extra_arguments(parser: ScriptParser) -> None:
    """Beyond the original: negative prompt and prompt syntax, device choice, safety checker, speed and memory."""
    prompt = parser.group("prompt")
    prompt.add_argument("--negative_prompt", type=str, default="",
                        help="what to steer away from (replaces the empty unconditional prompt)")
    prompt.add_argument("--emphasis", type=str, choices=EMPHASIS_MODES, default="original",
                        help="original: AUTOMATIC1111's prompt syntax, (word:1.3) (word) [word] BREAK, prompts of any "
                             "length; none: brackets are text and prompts are cut at 77 tokens, the original's "
                             "conditioning byte for byte")
    prompt.add_argument("--clip_skip", type=int, default=1, metavar="N",
                        help="use the text encoder's layer N from the end (AUTOMATIC1111's 'Clip skip: N'; "
                             "diffusers' clip_skip=N-1); many anime fine-tunes want 2")
    prompt.add_argument("--lora", type=str, action="append", default=[], metavar="FILE[:WEIGHT]",
                        help="merge this LoRA/LyCORIS file into the model at WEIGHT (default 1); repeatable, they "
                             "stack. <lora:NAME:WEIGHT> in a prompt does the same for --lora_dir/NAME.safetensors")
    prompt.add_argument("--lora_dir", type=str, default=DEFAULT_LORA_DIR, metavar="DIR",
                        help="where <lora:NAME:WEIGHT> tags in prompts find their files")
    prompt.add_argument("--embeddings", type=str, default=None, metavar="DIR",
                        help=f"textual-inversion embeddings (.pt, .bin, .safetensors), each used as the word of its "
                             f"file name (default: {DEFAULT_EMBEDDINGS}/ if it exists)")
    parser.group("model").add_argument("--device", type=str, default="auto", choices=DEVICES,
                                       help="where to run: auto picks cuda, then mps, then cpu")
    safety = parser.group("safety")
    safety.add_argument("--safety_checker", type=str, default=None, metavar="DIR",
                        help="local diffusers-format copy of CompVis/stable-diffusion-safety-checker "
                             "(default: the Hugging Face cache's copy, if any)")
    safety.add_argument("--no_safety_checker", action="store_true", help="run without the safety checker")
    speed = parser.group("speed")
    speed.add_argument("--cuda_graph", action=argparse.BooleanOptionalAction, default=None,
                       help="replay the UNet from CUDA graphs (default: on with CUDA)")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the UNet (a wait on the first run; later runs reuse the compile cache)")
    speed.add_argument("--attention_slicing", type=int, default=0, metavar="TOKENS",
                       help="attend over at most this many query tokens at a time (0: off); for small cards")
    speed.add_argument("--vae_slicing", action="store_true", help="decode one image at a time; for small cards")
    speed.add_argument("--vae_tiling", action="store_true",
                       help="decode large images by overlapping 512-pixel tiles, cross-faded: the decoder's memory "
                            "no longer grows with the image (seams can show faintly)")
    speed.add_argument("--pad_cond_uncond", action="store_true",
                       help="a prompt and negative prompt of different lengths: pad the shorter with empty chunks "
                            "and guide in one batch (faster, slightly different) instead of two UNet calls")
    speed.add_argument("--backend", type=str, choices=BACKENDS, default="torch",
                       help="the engine of the UNet and VAE decoder: torch; openvino (CPU, faster; converted "
                            "once, cached in ~/.cache/ldm/openvino); auto: openvino where it runs, else torch")
    speed.add_argument("--winograd", action=argparse.BooleanOptionalAction, default=True,
                       help="CPU, float32: wide 3×3 convolutions by Winograd F(2×2, 3×3), faster but holding "
                            "transformed kernels (+3.7 GB for SD v1)")


def add_run_arguments(parser: ScriptParser) -> None:
    """Runs of many images: per-image seeds (which torchrun needs), their noise device, resuming."""
    output = parser.group("output")
    output.add_argument("--seed_mode", type=str, choices=SEED_MODES, default=None,
                        help="original: one random stream from --seed for the whole run (the default for one "
                             "process); per_image: image k from seed + k, saved as samples/{k:05d}.png, the same "
                             "picture whatever the batch size or number of processes (the default under torchrun "
                             "and with --resume)")
    output.add_argument("--noise_device", type=str, choices=NOISE_DEVICES, default=None,
                        help="per_image: where the noise is drawn; cpu (default) gives the same picture on any "
                             "device, model draws on the model's device")
    output.add_argument("--resume", action="store_true",
                        help="per_image: complete the run in --outdir, drawing only the images whose file is "
                             "missing (refused if its manifest.jsonl has other settings)")


def check_run_flags(args: argparse.Namespace, process: Process) -> None:
    """Decide --seed_mode (per_image under a launcher or with --resume) and check what goes with it."""
    args.seed_mode = args.seed_mode or ("per_image" if launched() or args.resume else "original")
    if args.seed_mode == "original":
        if process.world_size > 1:
            raise InputError("--seed_mode original draws one random stream for the whole run, which cannot be split "
                             f"over {process.world_size} processes: use --seed_mode per_image")
        for flag, value in (("--resume", args.resume), ("--noise_device", args.noise_device)):
            if value:
                raise InputError(f"{flag} needs --seed_mode per_image")
        return
    for flag, value in (("--fixed_code", getattr(args, "fixed_code", False)), ("--skip_save", args.skip_save)):
        if value:
            raise InputError(f"{flag} does not go with --seed_mode per_image (each image has its own seed and "
                             "file)")
    args.noise_device = args.noise_device or "cpu"


def check_one_process(script: str) -> None:
    """Scripts without per-image seeds refuse a launcher's several processes (each would draw the whole run)."""
    world_size = process_from_environment().world_size
    if world_size > 1:
        raise InputError(f"{script} runs in one process; under torchrun each of the {world_size} would draw the "
                         "whole run (scripts/txt2img.py splits its images over processes)")


def run_per_image(args: argparse.Namespace, process: Process, pipeline: Pipeline, metadata: dict,
                  source: Callable[[], Iterator[str]], draw: Callable[[list[str], ImageGenerators], Generated]
                  ) -> None:
    """This process's share of a per-image run (:mod:`ldm.sharding`) of the prompts ``source`` gives (see
    :func:`prompt_source`); rank 0 closes it."""
    settings = dict(metadata, config=Path(args.config).name, checkpoint_bytes=Path(args.ckpt).stat().st_size,
                    seed_mode=args.seed_mode, noise_device=args.noise_device, precision=pipeline.precision,
                    backend=pipeline.acceleration.backend)
    noise_device = "cpu" if args.noise_device == "cpu" else pipeline.device
    run = ShardedRun(Path(args.outdir), process, settings, metadata, args.seed, noise_device, args.resume)
    run.run(lambda: work_items(source, args.n_iter), args.n_samples, draw)
    message = run.finish(not args.skip_grid, args.n_rows or args.n_samples)
    if message:
        print(message)


def acceleration_from_args(args: argparse.Namespace) -> Acceleration:
    """The speed flags (without --cuda_graph / --no-cuda_graph: on where there is CUDA)."""
    return Acceleration(compile=args.compile, cuda_graph=args.cuda_graph, attention_slicing=args.attention_slicing,
                        vae_slicing=args.vae_slicing, vae_tiling=args.vae_tiling, winograd=args.winograd,
                        backend=args.backend)


def pipeline_from_args(args: argparse.Namespace, config: DictConfig, sampler: str, size: str) -> Pipeline:
    """The pipeline the model, device, precision, safety and speed flags ask for; then the run's one summary line,
    and the global RNG seeded with --seed (the one seeding of a run: see :mod:`ldm.generation`)."""
    checker = False if args.no_safety_checker else args.safety_checker or True
    pipeline = Pipeline.from_config(config, args.ckpt, device=args.device, precision=args.precision,
                                    sampler=sampler, schedule=args.schedule, eta_ancestral=args.eta_ancestral,
                                    s_noise=args.s_noise, safety_checker=checker,
                                    acceleration=acceleration_from_args(args), vae=args.vae,
                                    ema=args.ema)
    configure_prompts(args, pipeline)
    logger.info("%s (%s): %s sampler, %d steps, %s, seed %d, %s, precision %s", Path(args.ckpt).name,
                Path(args.config).name, pipeline.sampler.name, args.ddim_steps, size, args.seed, pipeline.device.type,
                pipeline.precision)
    seed_everything(args.seed)
    return pipeline


def check_fits(args: argparse.Namespace, config: DictConfig, batch: int, height: int, width: int) -> None:
    """Refuse, before loading, a run whose batch cannot fit in memory (see :func:`activation_bytes`)."""
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    needed = activation_bytes(config, batch, height, width, precision, args.scale != 1.0, args.vae_slicing,
                              args.vae_tiling)
    free = available_bytes(device)
    if free is not None and needed > free:
        raise InputError(f"{batch} image(s) of {width}×{height} at once need about {needed / 2 ** 30:,.0f} GiB, but "
                         f"the {device.type} has {free / 2 ** 30:,.1f} GiB free: lower --n_samples or --H/--W "
                         "(--vae_slicing helps with many images, --vae_tiling with large ones)")


def lora_flags(values: list[str]) -> list[tuple[Path, float]]:
    """--lora FILE[:WEIGHT] values as (file, weight); each file must exist."""
    loras = []
    for value in values:
        path, _, weight = value.rpartition(":")
        try:
            entry = (Path(path), float(weight)) if path else (Path(value), 1.0)
        except ValueError:
            entry = (Path(value), 1.0)
        if not entry[0].is_file():
            raise InputError(f"--lora {entry[0]} does not exist")
        loras.append(entry)
    return loras


def check_lora_tags(args: argparse.Namespace, prompts: list[str]) -> None:
    """Every <lora:NAME> tag in ``prompts`` has its file in --lora_dir (checked before the model loads)."""
    for prompt in prompts:
        for name, _ in take_lora_tags(prompt)[1]:
            find_lora(name, args.lora_dir)


def file_metadata(args: argparse.Namespace) -> dict[str, str]:
    """The --lora files and weights and the --vae file for the images' metadata (tags in prompts stay in the
    prompt text)."""
    metadata = {}
    if args.loras:
        metadata["loras"] = ", ".join(f"{path.stem}:{weight:g}" for path, weight in args.loras)
        metadata["lora_hashes"] = ", ".join(f"{path.stem}: {file_hash(path)}" for path, _ in args.loras)
    return metadata | ({"vae": Path(args.vae).name} if args.vae else {})


def file_hash(path: Path) -> str:
    """The first 12 hex digits of a file's SHA-256, as AUTOMATIC1111 names LoRAs in its infotext."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def configure_prompts(args: argparse.Namespace, pipeline: Pipeline) -> None:
    """The prompt flags on the pipeline and its text encoder: emphasis, CLIP skip, embeddings, LoRAs."""
    encoder = pipeline.model.cond_stage_model
    layers = encoder.num_layers
    if not 1 <= args.clip_skip <= layers:
        raise InputError(f"--clip_skip must be between 1 and {layers} for this text encoder, got {args.clip_skip}")
    encoder.clip_skip, encoder.emphasis = args.clip_skip, args.emphasis
    pipeline.pad_cond_uncond = args.pad_cond_uncond
    pipeline.lora_dir = Path(args.lora_dir)
    pipeline.use_loras(args.loras)
    directory = Path(args.embeddings or DEFAULT_EMBEDDINGS)
    if args.embeddings and not directory.exists():
        raise InputError(f"--embeddings {directory} does not exist")
    if directory.exists():
        words = encoder.load_embeddings(directory)
        logger.info("embeddings: %s", ", ".join(words) if words else f"none in {directory}")


ASPECT_TOLERANCE = 0.02  # a user mask may differ this much in aspect ratio from the image before we refuse it


def load_mask(path: str, image_size: tuple[int, int]) -> Image.Image:
    """The user's --mask, refused if its aspect ratio differs from the image's (it is resized to the image)."""
    mask = open_image(path, "--mask")
    height, width = image_size
    if abs(mask.width / mask.height - width / height) > ASPECT_TOLERANCE * width / height:
        raise InputError(f"--mask {path} is {mask.width}×{mask.height} but the image is {width}×{height}: give a "
                         "mask with the image's aspect ratio")
    return mask


def apply_infotext(args: argparse.Namespace, path: str) -> None:
    """--from-png: take prompt, negative prompt, seed, steps, scale, size, sampler, η and CLIP skip from an image's
    AUTOMATIC1111 "parameters" text (ours or another tool's)."""
    image = open_image(path, "--from-png")
    text = getattr(image, "text", {}).get("parameters") or image.info.get("parameters")
    if not isinstance(text, str):
        raise InputError(f"--from-png {path} has no 'parameters' text to take the settings from")
    fields = parse_infotext(text)
    try:
        if "Size" in fields:
            args.W, args.H = map(int, fields["Size"].split("x"))
        args.prompt, args.negative_prompt = fields["prompt"], fields["negative_prompt"]
        args.seed, args.ddim_steps = int(fields.get("Seed", args.seed)), int(fields.get("Steps", args.ddim_steps))
        args.scale = float(fields.get("CFG scale", args.scale))
        args.ddim_eta, args.clip_skip = float(fields.get("Eta DDIM", 0.0)), int(fields.get("Clip skip", 1))
    except ValueError as error:
        raise InputError(f"--from-png {path}: cannot read its settings ({error})") from None
    apply_sampler_fields(args, path, fields)


def apply_sampler_fields(args: argparse.Namespace, path: str, fields: dict[str, str]) -> None:
    """Sampler, Schedule type and Eta of an infotext as flags. Our --dpm_solver writes "DPM++ 2M" on a "Uniform"
    schedule, which reads back as --dpm_solver; every other name goes through --sampler."""
    name, schedule = fields.get("Sampler", "DDIM"), fields.get("Schedule type")
    args.dpm_solver = name == A1111_SAMPLERS["dpm_solver"] and schedule == "Uniform"
    args.plms, args.sampler, args.schedule = False, None, None
    if args.dpm_solver:
        return
    try:
        key, named_schedule = resolve_sampler(name)
        args.sampler = name
        if key not in SAMPLERS and named_schedule is None:
            args.schedule = resolve_schedule(schedule)
        if "Eta" in fields and key not in SAMPLERS:
            args.eta_ancestral = float(fields["Eta"])
    except (ParameterError, ValueError) as error:
        raise InputError(f"--from-png {path}: cannot use its sampler {name!r} / schedule {schedule!r} "
                         f"({error})") from None


def run_batches(args: argparse.Namespace, batches: list[list[str]], output: RunOutput,
                make_images: Callable[[list[str]], Generated]) -> None:
    """The original's loop: --n_iter times every prompt batch, each batch's images saved as it comes, the grid
    and the closing message at the end."""
    with tqdm(total=args.n_iter * len(batches), desc="Sampling", unit="batch") as progress:
        for _ in range(args.n_iter):
            for prompts in batches:
                output.add(*make_images(prompts), prompts)
                progress.update()
    print(output.close(args.n_rows or args.n_samples, row_per_batch=not args.n_rows))


def sampler_name(args: argparse.Namespace) -> str:
    """--sampler, else the original's choice: --dpm_solver wins over --plms, else DDIM."""
    if args.sampler is not None:
        return args.sampler
    return "dpm_solver" if args.dpm_solver else "plms" if args.plms else "ddim"


def check_sampler_flags(args: argparse.Namespace) -> None:
    """--sampler with its --schedule, --eta_ancestral, --s_noise and --ddim_eta."""
    if args.sampler is not None and (args.plms or args.dpm_solver):
        raise InputError(f"--sampler {args.sampler} and {'--dpm_solver' if args.dpm_solver else '--plms'} both "
                         "choose a sampler: give one")
    key, _ = check_sampler(sampler_name(args), args.schedule, eta_ancestral=args.eta_ancestral, s_noise=args.s_noise)
    if args.ddim_eta != 0 and key != "ddim":
        chosen = args.sampler or ("--dpm_solver" if args.dpm_solver else "--plms")
        raise InputError(f"--ddim_eta must be 0 with {chosen} (only DDIM samples stochastically with it; ancestral "
                         "and SDE samplers take --eta_ancestral)")
    if key == "dpm_solver" and args.ddim_steps < 2:
        raise InputError(f"--ddim_steps must be at least 2 for DPM-Solver++(2M), got {args.ddim_steps}")


def check_values(args: argparse.Namespace) -> None:
    """What every script checks first: flags given without a value, the guidance scale, the seed (``-1``: a random
    one, reported by the run and kept in every image's metadata)."""
    for flag in ("prompt", "outdir"):
        if getattr(args, flag, "") is None:
            raise InputError(f"--{flag} needs a value")
    if not 0 <= args.scale <= MAX_SCALE:
        raise InputError(f"--scale must be between 0 and {MAX_SCALE:g}, got {args.scale}")
    args.seed = secrets.randbelow(2 ** 32) if args.seed == -1 else check_seed(args.seed)
    args.loras = lora_flags(args.lora)


def check_common(args: argparse.Namespace) -> None:
    """Checks that need no model: values, counts, sampler options, the output directory."""
    check_values(args)
    for flag in ("ddim_steps", "n_samples", "n_iter"):
        if getattr(args, flag) <= 0:
            raise InputError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if args.ddim_steps > 1000:
        raise InputError(f"--ddim_steps must be at most 1000, got {args.ddim_steps}")
    if args.n_rows < 0:
        raise InputError(f"--n_rows must be 0 (one row per batch) or positive, got {args.n_rows}")
    if not 0 <= args.ddim_eta <= 1:  # beyond 1 the DDIM step's √(1 − ᾱ_prev − σ²) turns imaginary
        raise InputError(f"--ddim_eta must be between 0 and 1, got {args.ddim_eta}")
    check_sampler_flags(args)
    check_writable(args.outdir)


def prompt_lines(path: Path) -> Iterator[str]:
    """The non-blank lines of a prompt file, stripped, read as they are needed."""
    try:
        with path.open(encoding="utf-8") as file:
            for line in file:
                if line.strip():
                    yield line.strip()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read --from-file {path}: {error.strerror if isinstance(error, OSError) else error}"
                         ) from None


def prompt_source(args: argparse.Namespace) -> Callable[[], Iterator[str]]:
    """The prompts of one pass, as often as asked: ``n_samples`` copies of --prompt, or the lines of --from-file
    streamed (checked once now: readable, not empty, every LoRA tag's file there)."""
    if not args.from_file:
        check_lora_tags(args, [args.prompt])
        return lambda: iter(args.n_samples * [args.prompt])
    path = Path(args.from_file)
    count = 0
    for prompt in prompt_lines(path):
        check_lora_tags(args, [prompt])
        count += 1
    if not count:
        raise InputError(f"--from-file {path} contains no prompts")
    return lambda: prompt_lines(path)


def prompt_batches(args: argparse.Namespace) -> list[list[str]]:
    """``n_samples`` copies of --prompt, or the lines of --from-file in batches of ``n_samples`` (the last may be
    shorter; blank lines are skipped)."""
    prompts = list(prompt_source(args)())
    return [prompts[i:i + args.n_samples] for i in range(0, len(prompts), args.n_samples)]
