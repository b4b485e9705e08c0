"""The original scripts' loops, written out step for step as CompVis' txt2img.py / img2img.py and their DDIM and
PLMS samplers run them (float32 tensors, a noise draw in every DDIM update), to compare our scripts' pictures and
random-number use with. DPM-Solver is the seed's: ``DPM_Solver(model_wrapper(...)).sample`` on fresh noise.
A v-prediction model (the demo model) is read as Stability's SD 2 samplers read it: ε from (x_t, v).
"""

import numpy as np
import torch

from ldm.models.diffusion.dpm_solver import DPM_Solver, NoiseScheduleVP, model_wrapper
from ldm.util import seed_everything


class OriginalDDIM:
    """CompVis' DDIMSampler: make_schedule, p_sample_ddim; PLMS on the same schedule (p_sample_plms)."""

    def __init__(self, model, steps: int, eta: float):
        self.model = model
        alphacums = model.alphas_cumprod.cpu()
        self.timesteps = np.asarray(list(range(0, 1000, 1000 // steps))) + 1
        self.timesteps = self.timesteps[self.timesteps < 1000]
        alphas = alphacums[self.timesteps]
        alphas_prev = np.asarray([alphacums[0]] + alphacums[self.timesteps[:-1]].tolist())
        sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
        self.alphas = torch.as_tensor(alphas, dtype=torch.float32)
        self.alphas_prev = torch.as_tensor(alphas_prev, dtype=torch.float32)
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32)

    def eps(self, x, step, c, uc, scale):
        t = torch.full((x.shape[0],), int(step), dtype=torch.long)
        if uc is None:
            out = self.model.apply_model(x, t, c)
        else:
            e_u, e_c = self.model.apply_model(torch.cat([x] * 2), torch.cat([t] * 2), torch.cat([uc, c])).chunk(2)
            out = e_u + scale * (e_c - e_u)
        return self.model.predict_eps_from_z_and_v(x, t, out) if self.model.parameterization == "v" else out

    def x_prev(self, x, e_t, index):
        a_t, a_prev, sigma_t = (torch.full((x.shape[0], 1, 1, 1), float(v[index]))
                                for v in (self.alphas, self.alphas_prev, self.sigmas))
        pred_x0 = (x - (1.0 - a_t).sqrt() * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t
        noise = sigma_t * torch.randn(x.shape)  # noise_like(x.shape, device), drawn whatever sigma is
        return a_prev.sqrt() * pred_x0 + dir_xt + noise

    def ddim(self, x, c, uc, scale, start: int | None = None):
        time_range = np.flip(self.timesteps[:start] if start is not None else self.timesteps)
        for i, step in enumerate(time_range):
            x = self.x_prev(x, self.eps(x, step, c, uc, scale), len(time_range) - i - 1)
        return x

    def plms(self, x, c, uc, scale):
        time_range = np.flip(self.timesteps)
        old_eps = []
        for i, step in enumerate(time_range):
            index = len(time_range) - i - 1
            e_t = self.eps(x, step, c, uc, scale)
            if not old_eps:
                x_next = self.x_prev(x, e_t, index)
                e_t_prime = (e_t + self.eps(x_next, time_range[min(i + 1, len(time_range) - 1)], c, uc, scale)) / 2
            elif len(old_eps) == 1:
                e_t_prime = (3 * e_t - old_eps[-1]) / 2
            elif len(old_eps) == 2:
                e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
            else:
                e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
            x = self.x_prev(x, e_t_prime, index)
            old_eps = [*old_eps, e_t][-3:]
        return x


def dpm_solver(model, x, c, uc, scale, steps):
    schedule = NoiseScheduleVP("discrete", alphas_cumprod=model.alphas_cumprod)
    model_fn = model_wrapper(lambda x, t, cond: model.apply_model(x, t, cond), schedule,
                             model_type="v" if model.parameterization == "v" else "noise",
                             guidance_type="classifier-free", condition=c, unconditional_condition=uc,
                             guidance_scale=scale)
    return DPM_Solver(model_fn, schedule, algorithm_type="dpmsolver++").sample(
        x, steps=steps, skip_type="time_uniform", method="multistep", order=2, lower_order_final=True)


def to_uint8(model, latents) -> list[np.ndarray]:
    images = torch.clamp((model.decode_first_stage(latents) + 1.0) / 2.0, min=0.0, max=1.0)
    return list((255.0 * images.permute(0, 2, 3, 1).numpy()).astype(np.uint8))


@torch.no_grad()
def txt2img(model, batches: list[list[str]], *, sampler: str, steps: int, scale: float, eta: float, n_iter: int,
            seed: int, latent_shape: tuple[int, int, int], fixed_code: bool = False) -> list[np.ndarray]:
    """The samples CompVis' txt2img.py saves, in order (noise on the CPU, where these tests run)."""
    seed_everything(seed)
    start_code = torch.randn(len(batches[0]), *latent_shape) if fixed_code else None
    ddim = OriginalDDIM(model, steps, eta)
    samples = []
    for _ in range(n_iter):
        for prompts in batches:
            uc = model.get_learned_conditioning(len(prompts) * [""]) if scale != 1.0 else None
            c = model.get_learned_conditioning(prompts)
            x = start_code[:len(prompts)] if fixed_code else torch.randn(len(prompts), *latent_shape)
            run = {"ddim": lambda: ddim.ddim(x, c, uc, scale), "plms": lambda: ddim.plms(x, c, uc, scale),
                   "dpm_solver": lambda: dpm_solver(model, x, c, uc, scale, steps)}[sampler]
            samples += to_uint8(model, run())
    return samples


@torch.no_grad()
def img2img(model, init_image: torch.Tensor, batches: list[list[str]], *, steps: int, scale: float, eta: float,
            strength: float, n_iter: int, seed: int) -> list[np.ndarray]:
    """The samples CompVis' img2img.py (DDIM only) saves: one posterior sample, then per batch noise to index
    t_enc and DDIM from index t_enc − 1."""
    seed_everything(seed)
    init_latent = model.get_first_stage_encoding(model.encode_first_stage(init_image.repeat(len(batches[0]), 1, 1, 1)))
    ddim = OriginalDDIM(model, steps, eta)
    t_enc = int(strength * steps)
    samples = []
    for _ in range(n_iter):
        for prompts in batches:
            uc = model.get_learned_conditioning(len(prompts) * [""]) if scale != 1.0 else None
            c = model.get_learned_conditioning(prompts)
            x0 = init_latent[:len(prompts)]
            z_enc = ddim.alphas[t_enc].sqrt() * x0 + (1.0 - ddim.alphas[t_enc]).sqrt() * torch.randn_like(x0)
            samples += to_uint8(model, ddim.ddim(z_enc, c, uc, scale, start=t_enc))
    return samples
