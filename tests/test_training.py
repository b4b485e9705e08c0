"""The demo model's recipe is reproducible: each config trains from scratch through main.py and its loss falls."""

import pytest
import torch

from conftest import ROOT, load_script
from ldm.models.loading import ConfigError, build_model, load_config, load_model
from ldm.models.training import AutoencoderTraining, DiffusionTraining, export_weights
from ldm.modules.encoders.modules import lend_attention_key
from ldm.util import instantiate_from_config, seed_everything

main = load_script("../main")
AUTOENCODER = ROOT / "configs/demo/shapes-autoencoder.yaml"
LDM = ROOT / "configs/demo/shapes-ldm.yaml"


def fixed_batch(config, size: int = 8) -> dict:
    dataset = instantiate_from_config(config.data.train)
    items = [dataset[i] for i in range(size)]
    return {"image": torch.stack([item["image"] for item in items]), "caption": [item["caption"] for item in items]}


def test_the_autoencoder_trains(tmp_path):
    overrides = ["lightning.trainer.max_steps=40", "data.batch_size=4", "data.train.params.length=64",
                 "training.params.learning_rate=2e-3"]
    assert main.main(["--base", str(AUTOENCODER), "-t", "-l", str(tmp_path), "-n", "ae", *overrides]) == 0
    config = load_config(AUTOENCODER)
    batch = fixed_batch(config)
    seed_everything(23)
    before = AutoencoderTraining(build_model(config)).training_step(batch, 0).item()
    after = AutoencoderTraining(load_model(AUTOENCODER, tmp_path / "ae" / "model.safetensors")).training_step(
        batch, 0).item()
    assert after < 0.7 * before


def test_the_latent_diffusion_model_trains(tmp_path):
    config = load_config(LDM)
    autoencoder = export_weights(instantiate_from_config(config.model.params.first_stage_config),
                                 tmp_path / "ae.safetensors")
    overrides = ["lightning.trainer.max_steps=40", "data.batch_size=8", "data.train.params.length=64",
                 f"training.params.first_stage_ckpt={autoencoder}", "lightning.evaluation=null",
                 "model.params.scheduler_config.params.warm_up_steps=[5]"]
    assert main.main(["--base", str(LDM), "-t", "-l", str(tmp_path), "-n", "ldm", *overrides]) == 0

    def loss(model) -> float:
        module = DiffusionTraining(model, caption_dropout=0.0)
        batch = fixed_batch(config)
        torch.manual_seed(0)
        with torch.no_grad():
            cond = model.get_learned_conditioning(batch["caption"])
            return module.loss(module.latents(batch), cond).item()

    seed_everything(23)
    initial = build_model(config)
    initial.first_stage_model.load_state_dict(load_model(LDM, tmp_path / "ldm" / "model.safetensors")
                                              .first_stage_model.state_dict())
    trained = load_model(LDM, tmp_path / "ldm" / "model.safetensors")
    initial.scale_factor.copy_(trained.scale_factor)
    assert loss(trained) < 0.8 * loss(initial)


def test_min_snr_weights_clip_the_signal_to_noise_ratio():
    """Min-SNR-γ for ε: min(SNR, γ)/SNR, i.e. 1 where SNR ≤ γ (noisy steps) and γ/SNR on the nearly clean ones."""
    model = build_model(load_config(LDM))
    t = torch.tensor([0, 100, 500, 999])
    alphas_cumprod = model.alphas_cumprod[t].double()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weights = DiffusionTraining(model, snr_gamma=5.0).loss_weights(t).double()
    assert torch.allclose(weights, torch.where(snr > 5.0, 5.0 / snr, torch.ones_like(snr)), rtol=1e-5)
    assert weights[0] < 0.01 and weights[-1] == 1.0
    assert torch.equal(DiffusionTraining(model).loss_weights(t), torch.ones(4))


def test_main_runs_no_code_from_a_config(tmp_path, monkeypatch, capsys):
    """main.py builds data, the training module and callbacks from configs: every target is checked first."""
    monkeypatch.chdir(tmp_path)
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(LDM.read_text().replace("target: ldm.data.shapes.ShapesDataset\n    params: { length: 40000",
                                               "target: os.system\n    params: { command: 'touch PWNED'"))
    assert main.main(["--base", str(hostile), "-t", "-l", str(tmp_path)]) == 2
    override = ["--base", str(LDM), "-l", str(tmp_path), "training.target=os.system"]
    assert main.main(override) == 2
    assert not (tmp_path / "PWNED").exists()
    assert all(line.startswith("error: ") and "os.system" in line for line in capsys.readouterr().err.splitlines())


def test_a_value_the_dataset_refuses_is_one_line_and_exit_2(tmp_path, capsys):
    overrides = ["training.params.first_stage_ckpt=null", "data.train.params.mentions.shade=0.5"]
    assert main.main(["--base", str(LDM), "-t", "-l", str(tmp_path), *overrides]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: data.train cannot be built: mentions: unknown attributes "
                                                    "['shade']; known: ['size', 'position', 'background', 'colour']"]


def test_the_joint_average_covers_the_unet_and_the_text_encoder_and_is_swapped_back():
    """LitEma averages the UNet only; a text encoder trained along must be averaged with it, or the exported
    UNet would read features the exported text encoder no longer gives."""
    model = build_model(load_config(LDM))
    module = DiffusionTraining(model, ema_decay=0.5)
    names = module.trained_parameters()
    assert any(n.startswith("model.diffusion_model.") for n in names)
    assert any(n.startswith("cond_stage_model.transformer.") for n in names)
    unet = model.model.diffusion_model.out[-1].bias
    text = model.cond_stage_model.transformer.text_model.final_layer_norm.bias
    module.update_average()  # the first update copies the weights
    with torch.no_grad():
        unet.add_(1.0)
        text.add_(1.0)
    module.update_average()  # warm-up decay min(0.5, 3/12) = 0.25: the average moves 3/4 of the way
    with module.averaged():
        averaged_unet, averaged_text = unet.detach().clone(), text.detach().clone()
    assert torch.allclose(averaged_unet + 0.25, unet.detach(), atol=1e-6)  # both averaged, both swapped back
    assert torch.allclose(averaged_text + 0.25, text.detach(), atol=1e-6)


def test_offset_noise_hides_each_channels_mean():
    """noise_offset s adds s·N(0, 1) per channel: the per-channel mean's variance goes from 1/(H·W) to that + s²,
    while each pixel keeps N(0, 1 + s²)."""
    model = build_model(load_config(LDM))
    z = torch.zeros(4096, 8, 16, 16)
    torch.manual_seed(0)
    plain = DiffusionTraining(model).noise(z)
    offset = DiffusionTraining(model, noise_offset=0.3).noise(z)
    assert abs(plain.mean(dim=(2, 3)).var().item() - 1 / 256) < 0.0005
    assert abs(offset.mean(dim=(2, 3)).var().item() - (1 / 256 + 0.09)) < 0.005
    assert abs(offset.var().item() - 1.09) < 0.01
    pyramid = DiffusionTraining(model, noise_pyramid=0.5).noise(z)
    assert pyramid.shape == z.shape and abs(pyramid.var().item() - (1 + sum(0.25 ** k for k in range(1, 5)))) < 0.02


def test_continuing_may_add_zero_initialised_modules_and_take_the_configs_schedule(tmp_path):
    """A run that adds attention at 16×16 (``init_adds_modules``) starts from the checkpoint's network exactly
    (the new blocks' output projections are zero), keeps the rest strict, and a zero-terminal-SNR run keeps its
    own schedule over the checkpoint's buffers."""
    config = load_config(LDM)
    seed_everything(0)
    checkpoint = export_weights(build_model(config), tmp_path / "start.safetensors")
    config.model.params.unet_config.params.attention_resolutions = [1, 2, 4]
    config.model.params.update(parameterization="v", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="does not fit"):
        DiffusionTraining(build_model(config), init_ckpt=str(checkpoint))
    module = DiffusionTraining(build_model(config), init_ckpt=str(checkpoint), init_adds_modules=True)
    start = load_model(LDM, checkpoint)
    x, t = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 900])
    with torch.no_grad():
        context = start.get_learned_conditioning(["a red star", "a small blue circle"])
        torch.testing.assert_close(module.model.apply_model(x, t, context), start.apply_model(x, t, context))
    assert module.model.alphas_cumprod[-1].item() == 2.0 ** -24 < start.alphas_cumprod[-1].item()
    config.model.params.unet_config.params.attention_resolutions = [2]  # the checkpoint's 4×4 attention: unexpected
    with pytest.raises(ValueError, match="does not fit"):
        DiffusionTraining(build_model(config), init_ckpt=str(checkpoint), init_adds_modules=True)


def test_a_lent_attention_key_is_applied_to_the_weights_continued_from(tmp_path):
    """``lend_attention_key`` acts on the checkpoint's embeddings (after loading, not before it overwrites them); a
    typo in it is one ConfigError (main.py: one line, exit 2), not a traceback."""
    config = load_config(LDM)
    seed_everything(0)
    checkpoint = export_weights(build_model(config), tmp_path / "start.safetensors")
    lend = {"words": ["top", "bottom"], "like": ["left", "right"], "weight": 3.0, "spread": 1.0}
    module = DiffusionTraining(build_model(config), init_ckpt=str(checkpoint), lend_attention_key=lend)
    expected = load_model(LDM, checkpoint).cond_stage_model
    lend_attention_key(expected, **lend)
    torch.testing.assert_close(module.model.cond_stage_model.token_embedding.weight, expected.token_embedding.weight)
    assert not torch.equal(expected.token_embedding.weight, load_model(LDM, checkpoint).cond_stage_model
                           .token_embedding.weight)
    with pytest.raises(ConfigError, match="lend_attention_key: .*wieght"):
        DiffusionTraining(build_model(config), lend_attention_key={"words": ["top"], "like": ["left"], "wieght": 3})
