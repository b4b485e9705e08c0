"""The KL autoencoder: original layout, same encode/decode as diffusers' AutoencoderKL on the same weights."""

import torch

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
