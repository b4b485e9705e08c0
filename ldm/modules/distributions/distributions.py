"""The autoencoder's posterior q(z|x) = N(mean, diag(exp(logvar)))."""

import torch


class DiagonalGaussianDistribution:
    """Diagonal Gaussian from ``parameters`` (B, 2C, H, W) split into mean and log-variance (clamped to [−30, 20])."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.logvar = torch.zeros_like(self.mean)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std·ε; ε is drawn in float32 on the generator's device (the CPU by default, as the original)."""
        device = generator.device if generator is not None else "cpu"
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        if self.deterministic:
            noise = torch.zeros_like(noise)
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL(self ‖ other) per batch element, summed over C, H, W; ``other`` defaults to N(0, I)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        if other is None:
            terms = self.mean ** 2 + self.var - 1.0 - self.logvar
        else:
            terms = (self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * terms.sum(dim=[1, 2, 3])
