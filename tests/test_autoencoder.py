"""The KL autoencoder: original layout, same encode/decode as diffusers' AutoencoderKL on the same weights; tiled
decoding cross-fades exactly and stays within its stated bound of the whole decode."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from ldm.data.shapes import random_scene, render
from ldm.models.autoencoder import tile_starts, tiled_decode
from ldm.models.loading import load_model
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.testing.diffusers_interop import diffusers_vae
from ldm.util import count_params


def test_v1_autoencoder_has_original_layout(v1_meta_model, v1_original_config):
    vae = diffusers_vae(v1_meta_model.state_dict(), v1_original_config, meta=True)  # strict load
    assert vae.config.scaling_factor == v1_meta_model.scale_factor == 0.18215
    assert count_params(v1_meta_model.first_stage_model) == count_params(vae) == 83_653_863


def test_tiny_autoencoder_matches_diffusers(tiny_model, tiny_original_config):
    vae = diffusers_vae(tiny_model.state_dict(), tiny_original_config)
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, 64, 48, generator=generator) * 2 - 1
    latent = torch.randn(2, 4, 8, 6, generator=generator)
    with torch.no_grad():
        ours_posterior = tiny_model.encode_first_stage(image)
        theirs_posterior = vae.encode(image).latent_dist
        ours_image = tiny_model.decode_first_stage(latent)
        theirs_image = vae.decode(latent / vae.config.scaling_factor).sample
    assert (ours_posterior.mean - theirs_posterior.mean).abs().max() <= 1e-4
    assert (ours_posterior.logvar - theirs_posterior.logvar).abs().max() <= 1e-4
    assert ours_image.abs().mean() > 0.1
    assert (ours_image - theirs_image).abs().max() <= 1e-4


def test_posterior_sample_draws_on_the_generator_and_scales():
    parameters = torch.cat([torch.full((1, 4, 2, 2), 3.0), torch.full((1, 4, 2, 2), 2 * torch.log(torch.tensor(0.5)))],
                           dim=1)
    posterior = DiagonalGaussianDistribution(parameters)
    noise = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(7))
    sample = posterior.sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(sample, 3.0 + 0.5 * noise)
    assert torch.equal(posterior.mode(), torch.full((1, 4, 2, 2), 3.0))


def test_kl_to_standard_normal_is_closed_form():
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()),
                                                 torch.distributions.Normal(0.0, 1.0)).sum(dim=[1, 2, 3])
    torch.testing.assert_close(posterior.kl(), expected)


@pytest.mark.parametrize("size, tile, overlap", [(64, 64, 16), (65, 64, 16), (100, 64, 16), (300, 64, 16), (9, 4, 2)])
def test_tiles_cover_the_latent_at_one_size_overlapping_enough(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, size) == size
    assert all(0 < later - earlier <= tile - overlap for earlier, later in zip(starts, starts[1:]))


def test_tiled_decode_of_a_pixelwise_map_is_the_whole_decode():
    """A "decoder" that maps each latent pixel on its own gives every tile the same pixels the whole decode has, so
    the cross-fade must return exactly the whole decode: the weights sum to one everywhere."""
    def decode(z):
        return F.interpolate(torch.tanh(z[:, :3]) * 2, scale_factor=4)

    z = torch.randn(2, 4, 21, 30, generator=torch.Generator().manual_seed(0))
    seen = []
    tiled = tiled_decode(lambda piece: seen.append(piece.shape[-2:]) or decode(piece), z, 8, 3)
    torch.testing.assert_close(tiled, decode(z))
    assert set(seen) == {(8, 8)}  # the decoder's memory is that of one tile


# Max and mean |difference| (of 255) between the demo VAE's tiled and whole decode of two encoded 128-pixel scenes,
# 32×32 latents in tiles of 16 overlapping by 4: measured 61 / 2.3 (tiles of 24: 24 / 1.95; a wider overlap changes
# little: the error is GroupNorm's per-tile statistics more than the cut context).
TILED_BOUND_MAX, TILED_BOUND_MEAN = 80, 3.5


def test_tiled_decode_of_the_demo_model_stays_near_the_whole_decode():
    model = load_model(ROOT / "configs/demo/shapes-inference.yaml", ROOT / "models/demo/shapes.safetensors")
    generator = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(3)
    scenes = [np.asarray(render(random_scene(rng), 128), dtype=np.float32) / 127.5 - 1 for _ in range(2)]
    images = torch.from_numpy(np.stack(scenes)).permute(0, 3, 1, 2)
    with torch.no_grad():
        z = model.get_first_stage_encoding(model.encode_first_stage(images), generator)
        whole = model.decode_first_stage(z)
        model.first_stage_model.tiling = (16, 4)
        tiled = model.decode_first_stage(z)
    difference = ((tiled - whole).abs() * 127.5).clamp(max=255)
    print(f"tiled vs whole: max {difference.max():.2f}, mean {difference.mean():.3f} of 255")
    assert difference.max() <= TILED_BOUND_MAX and difference.mean() <= TILED_BOUND_MEAN
