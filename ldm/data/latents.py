"""A captioned image dataset encoded once by the autoencoder, so diffusion training skips the encoder."""

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


class PreEncoded(Dataset):
    """Items {"latent_mean", "latent_std", "caption"}: the autoencoder's posterior for each image (unscaled).

    Training draws mean + std·ε each time, as encoding on the fly would.
    """

    def __init__(self, dataset: Dataset, autoencoder, batch_size: int = 256, image_key: str = "image",
                 caption_key: str = "caption"):
        means, stds, self.captions = [], [], []
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        with torch.no_grad():
            for batch in tqdm(loader, desc="encoding the dataset"):
                images = batch[image_key].permute(0, 3, 1, 2).float()
                posterior = autoencoder.encode(images)
                means.append(posterior.mean)
                stds.append(posterior.std)
                self.captions += list(batch[caption_key])
        self.means, self.stds = torch.cat(means), torch.cat(stds)
        self.caption_key = caption_key

    @classmethod
    def from_tensors(cls, means: torch.Tensor, stds: torch.Tensor, captions: list[str],
                     caption_key: str = "caption") -> "PreEncoded":
        """An encoding made earlier (e.g. read from a cache file), without encoding again."""
        encoded = cls.__new__(cls)
        encoded.means, encoded.stds, encoded.captions, encoded.caption_key = means, stds, list(captions), caption_key
        return encoded

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        return {"latent_mean": self.means[index], "latent_std": self.stds[index],
                self.caption_key: self.captions[index]}

    def latent_std(self, generator: torch.Generator | None = None) -> float:
        """Standard deviation of posterior samples over the dataset (for ``scale_by_std``)."""
        noise = torch.randn(self.means.shape, generator=generator)
        return float((self.means + self.stds * noise).std())
