"""Train a model from a config with PyTorch Lightning (the original's training entry, kept small).

    python main.py --base configs/demo/shapes-autoencoder.yaml -t
    python main.py --base configs/demo/shapes-ldm.yaml -t

A config has ``model`` (what to train), ``training`` (the Lightning module around it, from
``ldm.models.training``), ``data`` (``batch_size``, ``train`` dataset, optional ``pre_encode``) and
``lightning.trainer`` (Trainer arguments). The trained weights go to ``LOGDIR/NAME/model.safetensors``.
"""

import argparse
import contextlib
import logging
import pickle
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from ldm.data.latents import PreEncoded
from ldm.models.loading import ConfigError, build_model, load_config
from ldm.models.training import PeriodicEvaluation, export_weights
from ldm.util import InputError, get_obj_from_str, instantiate_from_config, seed_everything

logger = logging.getLogger("ldm.main")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-b", "--base", nargs="+", required=True, help="configs, merged left to right")
    parser.add_argument("-t", "--train", action="store_true", help="train (without it, only build and check)")
    parser.add_argument("-n", "--name", default=None, help="run name (default: the last config's file name)")
    parser.add_argument("-l", "--logdir", default="logs", help="where runs are written")
    parser.add_argument("-s", "--seed", type=int, default=23, help="seed for initialisation and data order")
    parser.add_argument("--export_dtype", choices=("float32", "float16"), default="float32",
                        help="dtype of the exported weights")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. lightning.trainer.max_steps=10")
    return parser.parse_args(argv)


def pre_encoded(config, dataset, model) -> PreEncoded:
    """``dataset`` encoded by the first stage, read from ``data.latent_cache`` when that file holds this
    dataset's encoding by these autoencoder weights (a lever study re-runs training on the same latents; the
    40 000 demo images take minutes to draw and encode), else encoded and written there."""
    cache = config.data.get("latent_cache")
    weights = model.first_stage_model.state_dict()
    fingerprint = [OmegaConf.to_yaml(config.data.train), len(weights),
                   float(sum(tensor.double().sum() for tensor in weights.values()))]
    if cache is not None and Path(cache).is_file():
        try:
            stored = torch.load(cache, weights_only=True)
            if stored["fingerprint"] == fingerprint:
                logger.info("latents read from %s", cache)
                return PreEncoded.from_tensors(stored["means"], stored["stds"], stored["captions"])
            logger.info("%s holds another dataset or autoencoder: encoding again", cache)
        except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as error:
            logger.warning("latent cache %s is unreadable (%s): encoding again", cache, error)
    encoded = PreEncoded(dataset, model.first_stage_model)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"fingerprint": fingerprint, "means": encoded.means, "stds": encoded.stds,
                    "captions": encoded.captions}, cache)
    return encoded


def training_data(config, model) -> DataLoader:
    try:
        dataset = instantiate_from_config(config.data.train)
    except ValueError as error:  # a value the dataset refuses (e.g. an unknown ShapesDataset mention)
        raise ConfigError(f"data.train cannot be built: {error}") from None
    if config.data.get("pre_encode", False):
        dataset = pre_encoded(config, dataset, model)
        if model.scale_by_std and config.get("training", {}).get("params", {}).get("init_ckpt") is None:
            # (a run that continues from a checkpoint keeps the scale its network learned with)
            model.scale_factor.fill_(1.0 / dataset.latent_std(torch.Generator().manual_seed(0)))
            logger.info("scale_factor set to 1/std of the latents: %.5f", model.scale_factor.item())
    return DataLoader(dataset, batch_size=config.data.batch_size, shuffle=True, drop_last=True,
                      num_workers=config.data.get("num_workers", 0))


def callbacks(config) -> list[pl.Callback]:
    """``lightning.evaluation``: {target: a function(model) -> dict of numbers, params, every_minutes}."""
    evaluation = config.lightning.get("evaluation")
    if evaluation is None:
        return []
    function = get_obj_from_str(evaluation.target)
    params = OmegaConf.to_container(evaluation.get("params", {}))
    return [PeriodicEvaluation(lambda model: function(model, **params), evaluation.get("every_minutes", 5.0))]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    seed_everything(args.seed)
    try:
        merged = OmegaConf.merge(*(load_config(path) for path in args.base), OmegaConf.from_dotlist(args.overrides))
        config = load_config(merged)  # the overrides may add interpolations and targets too: check them all again
        model = build_model(config)
        module = get_obj_from_str(config.training.target)(model, **config.training.get("params", {}))
        if not args.train:
            logger.info("built %s; pass -t to train", type(model).__name__)
            return 0
        loader = training_data(config, model)
        evaluation = callbacks(config)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    name = args.name or Path(args.base[-1]).stem
    run_dir = Path(args.logdir) / name
    trainer = pl.Trainer(default_root_dir=run_dir, logger=CSVLogger(run_dir, name="", version=""),
                         enable_checkpointing=False, accelerator="auto", devices=1, callbacks=evaluation,
                         **OmegaConf.to_container(config.lightning.trainer))
    start = time.perf_counter()
    try:
        trainer.fit(module, loader)
    finally:  # whatever happens, keep what was trained
        averaged = module.averaged() if hasattr(module, "averaged") else contextlib.nullcontext()
        with averaged:  # the joint moving average, where the training module keeps one
            path = export_weights(model, run_dir / "model.safetensors", getattr(torch, args.export_dtype))
        logger.info("trained %d steps in %.1f min; weights: %s", trainer.global_step,
                    (time.perf_counter() - start) / 60, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
