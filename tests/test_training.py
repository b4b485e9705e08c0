"""The demo model's recipe is reproducible: each config trains from scratch through main.py and its loss falls."""

import torch

from conftest import ROOT, load_script
from ldm.models.loading import build_model, load_config, load_model
from ldm.models.training import AutoencoderTraining, DiffusionTraining, export_weights
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
