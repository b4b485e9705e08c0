"""Our weights in diffusers' and transformers' classes, converted by diffusers' own single-file converters.

For cross-checks and benchmarks against the peer implementation; sampling never needs it.
"""

import copy
from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint,
                                                 create_unet_diffusers_config_from_ldm,
                                                 create_vae_diffusers_config_from_ldm)
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.modules.encoders.modules import clip_tokenizer

IMAGE_SIZE = 512  # only sets the config's nominal sample size; it saves diffusers guessing the model type


def _build(cls, config: Mapping[str, Any] | Any, state_dict: Mapping[str, torch.Tensor], meta: bool):
    with torch.device("meta") if meta else torch.device("cpu"):
        module = cls(**config) if isinstance(config, Mapping) else cls(config)
    module.load_state_dict(state_dict, strict=True, assign=meta)
    return module.eval()


def diffusers_unet(state_dict: Mapping[str, torch.Tensor], original_config: Mapping, meta: bool = False
                   ) -> UNet2DConditionModel:
    config = create_unet_diffusers_config_from_ldm(original_config, state_dict, image_size=IMAGE_SIZE)
    return _build(UNet2DConditionModel, config, convert_ldm_unet_checkpoint(dict(state_dict), config), meta)


def diffusers_vae(state_dict: Mapping[str, torch.Tensor], original_config: Mapping, meta: bool = False
                  ) -> AutoencoderKL:
    config = create_vae_diffusers_config_from_ldm(original_config, state_dict, image_size=IMAGE_SIZE)
    return _build(AutoencoderKL, config, convert_ldm_vae_checkpoint(dict(state_dict), config), meta)


def transformers_text_encoder(state_dict: Mapping[str, torch.Tensor], config: CLIPTextConfig, meta: bool = False
                              ) -> CLIPTextModel:
    """transformers ≥ 5 flattened CLIPTextModel: the converter's ``text_model.`` prefix is dropped."""
    converted = {key.removeprefix("text_model."): value for key, value in
                 convert_ldm_clip_checkpoint(dict(state_dict)).items() if not key.endswith("position_ids")}
    module = _build(CLIPTextModel, config, converted, meta)
    embeddings = module.embeddings  # its position_ids buffer is not in the state dict: on meta it stays empty
    embeddings.position_ids = torch.arange(config.max_position_embeddings,
                                           device=embeddings.token_embedding.weight.device)[None]
    return module


def transformers_openclip_text_encoder(state_dict: Mapping[str, torch.Tensor], embedder, meta: bool = False
                                       ) -> CLIPTextModel:
    """SD 2's text encoder as diffusers loads it: ``convert_open_clip_checkpoint`` (which leaves out ViT-H's 24th
    block, as SD 2 reads the penultimate layer, and the projection and logit scale, which conditioning does not
    use) into transformers' ``CLIPTextModel``, strictly."""
    converted = {key.removeprefix("text_model."): value for key, value in
                 convert_open_clip_checkpoint(None, dict(state_dict)).items() if not key.endswith("position_ids")}
    tower = embedder.model
    layers = len({key.split(".")[2] for key in converted if key.startswith("encoder.layers.")})
    config = CLIPTextConfig(vocab_size=tower.token_embedding.num_embeddings, hidden_size=embedder.width,
                            intermediate_size=tower.transformer.resblocks[0].mlp.c_fc.out_features,
                            num_hidden_layers=layers, num_attention_heads=tower.transformer.resblocks[0].attn.num_heads,
                            max_position_embeddings=tower.positional_embedding.shape[0], hidden_act="gelu",
                            layer_norm_eps=1e-5)
    module = _build(CLIPTextModel, config, converted, meta)
    embeddings = module.embeddings
    embeddings.position_ids = torch.arange(config.max_position_embeddings,
                                           device=embeddings.token_embedding.weight.device)[None]
    return module


def diffusers_pipeline(model, original_config: Mapping) -> StableDiffusionPipeline:
    """diffusers' StableDiffusionPipeline on ``model``'s weights, with a tokenizer of its own (textual inversion and
    LoRA loading change the tokenizer and text encoder they are given)."""
    state_dict = model.state_dict()
    tokenizer = clip_tokenizer.__wrapped__()
    tokenizer.model_max_length = 77
    # a copy of the config: textual-inversion loading resizes the vocabulary in the config it is given
    config = copy.deepcopy(model.cond_stage_model.transformer.text_model.config)
    text_encoder = transformers_text_encoder(state_dict, config)
    # diffusers 0.42's clip_skip path reads transformers 4's text_encoder.text_model.final_layer_norm; transformers
    # 5 flattened that level away. An unregistered alias gives diffusers the layout it expects.
    object.__setattr__(text_encoder, "text_model", text_encoder)
    return StableDiffusionPipeline(
        vae=diffusers_vae(state_dict, original_config), unet=diffusers_unet(state_dict, original_config),
        text_encoder=text_encoder, tokenizer=tokenizer, scheduler=DDIMScheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
