"""Exponential moving average of a model's weights, stored in the original checkpoint layout."""

import torch
from torch import nn


class LitEma(nn.Module):
    """Shadow copies of the trainable parameters of ``model``, as buffers of this module.

    Each shadow is named after the parameter path with the dots removed (``diffusion_model.out.2.weight`` →
    ``diffusion_modelout2weight``), which is how original checkpoints store them under ``model_ema.``.
    The update is shadow ← shadow − (1 − d)·(shadow − param) with the warm-up d = min(decay, (1+n)/(10+n)).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError("decay must be between 0 and 1")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int))
        self.shadow_names = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                shadow_name = name.replace(".", "")
                self.shadow_names[name] = shadow_name
                self.register_buffer(shadow_name, param.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA step towards the current weights of ``model``."""
        decay = self.decay
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = torch.minimum(decay, (1 + self.num_updates) / (10 + self.num_updates))
        shadows = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if name in self.shadow_names:
                shadow = shadows[self.shadow_names[name]]
                shadow.sub_((1.0 - decay).to(shadow.dtype) * (shadow - param))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        shadows = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if name in self.shadow_names:
                param.copy_(shadows[self.shadow_names[name]])

    def store(self, parameters) -> None:
        """Keep a copy of ``parameters`` to put back with :meth:`restore`."""
        self.collected_params = [param.detach().clone() for param in parameters]

    @torch.no_grad()
    def restore(self, parameters) -> None:
        for saved, param in zip(self.collected_params, parameters):
            param.copy_(saved)
        self.collected_params = []
