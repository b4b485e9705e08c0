"""3×3 convolutions by Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray 2016), for CPU inference.

Each 2×2 output tile is computed from a 4×4 input tile d and the 3×3 kernel g as

    Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A,

16 multiplications instead of 36. Over all tiles and channels the 16 elementwise products become 16 matrix
products (tiles × C_in)·(C_in × C_out): one batched GEMM that runs at the CPU's full matrix-multiply speed, where
oneDNN's direct convolution reaches only a third to a half of it on the UNet's narrow, wide-channel maps
(1280 channels at 8×8 or 16×16). The transforms are exact in real arithmetic; in float32 the result differs from
the direct convolution by rounding only (about 5e-6 relative, measured in tests/test_winograd.py).

The transformed kernel G g Gᵀ is 16/9 the size of the kernel; it is computed on first use and kept (not in the
state dict) until the weight changes.
"""

import torch
import torch.nn.functional as F
from torch import nn

# Input, kernel and output transforms of F(2×2, 3×3). Kronecker products apply Bᵀ·d·B and Aᵀ·m·A to tiles
# flattened row-major, so each transform is one matrix product over all tiles.
_B_T = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64, device="cpu")
_G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64, device="cpu")
_A_T = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64, device="cpu")
_INPUT_TRANSFORM = torch.kron(_B_T, _B_T).float()  # (16, 16)
_KERNEL_TRANSFORM = torch.kron(_G, _G).float()  # (16, 9)
_OUTPUT_TRANSFORM = torch.kron(_A_T, _A_T).float()  # (4, 16)

# Measured on a 2-core EPYC (float32, oneDNN direct convolution vs this): Winograd is 1.2–2.8× faster from
# 320 channels up at every map size of the UNet and the VAE, once each call is cut to at most 2048 output pixels
# (bands of rows, or groups of images) so that its tile buffers stay in cache; uncut it is 1.4× slower at 64×64.
# Below 320 channels the transforms cost more than the saved multiplications (1.2–3× slower at 32–256).
MAX_PIXELS_PER_CALL = 2048
MIN_CHANNELS = 320


def transform_kernel(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) → U = G g Gᵀ laid out as (16, C_in, C_out) for the batched product."""
    out_channels, in_channels = weight.shape[:2]
    u = weight.reshape(-1, 9) @ _KERNEL_TRANSFORM.to(weight).T  # (C_out·C_in, 16)
    return u.view(out_channels, in_channels, 16).permute(2, 1, 0).contiguous()


def winograd_conv3x3(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None,
                     max_pixels: int = MAX_PIXELS_PER_CALL) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=1) for x (B, C_in, H, W) with H, W even; ``kernel`` from
    :func:`transform_kernel`. Computed in pieces of at most ``max_pixels`` output pixels (whole images, or bands
    of an even number of rows).

    Works in (B, H, W, C) order, where each tile's channels are contiguous; the result is returned channels_last
    (a (B, C_out, H, W) view of (B, H, W, C_out) memory), which the following layers take as it is.
    """
    batch, _, height, width = x.shape
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (B, H + 2, W + 2, C_in)
    if batch * height * width <= max_pixels:
        out = _convolve_padded(padded, kernel)
    else:
        images = max(1, max_pixels // (height * width))
        rows = height if images > 1 else max(2, max_pixels // width // 2 * 2)
        out = x.new_empty(batch, height, width, kernel.shape[2])
        for first_image in range(0, batch, images):
            for first_row in range(0, height, rows):
                piece = padded[first_image:first_image + images, first_row:first_row + rows + 2]
                out[first_image:first_image + images, first_row:first_row + rows] = _convolve_padded(piece, kernel)
    if bias is not None:
        out.add_(bias)
    return out.permute(0, 3, 1, 2)


def _convolve_padded(padded: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The 3×3 'valid' convolution of an input padded by one pixel: (B, H + 2, W + 2, C_in) → (B, H, W, C_out)."""
    batch, in_channels = padded.shape[0], padded.shape[3]
    rows, cols = (padded.shape[1] - 2) // 2, (padded.shape[2] - 2) // 2
    out_channels = kernel.shape[2]
    tiles = padded.unfold(1, 4, 2).unfold(2, 4, 2)  # (B, rows, cols, C_in, 4, 4), overlapping by two pixels
    d = tiles.permute(4, 5, 0, 1, 2, 3).reshape(16, -1)
    v = (_INPUT_TRANSFORM.to(padded) @ d).view(16, batch * rows * cols, in_channels)
    m = torch.bmm(v, kernel)  # (16, tiles, C_out)
    y = (_OUTPUT_TRANSFORM.to(padded) @ m.view(16, -1)).view(2, 2, batch, rows, cols, out_channels)
    return y.permute(2, 3, 0, 4, 1, 5).reshape(batch, 2 * rows, 2 * cols, out_channels)


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in, out, 3, padding=1)`` that computes by Winograd F(2×2, 3×3) in float32 CPU inference.

    Same parameters and state-dict keys as ``nn.Conv2d``. Training (gradients on), other devices and dtypes,
    odd sides, fewer than ``MIN_CHANNELS`` channels and torch.compile'd graphs use the ordinary convolution.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.winograd = True
        self._kernel_cache: tuple[tuple[int, int], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._winograd_applies(x):
            return super().forward(x)
        return winograd_conv3x3(x, self._transformed_kernel(), self.bias)

    def _winograd_applies(self, x: torch.Tensor) -> bool:
        return (self.winograd and min(self.in_channels, self.out_channels) >= MIN_CHANNELS
                and x.device.type == "cpu" and x.dtype == torch.float32 == self.weight.dtype
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0)

    def _transformed_kernel(self) -> torch.Tensor:
        """G g Gᵀ, recomputed when the weight tensor is replaced or written to."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self._kernel_cache is None or self._kernel_cache[0] != key:
            self._kernel_cache = (key, transform_kernel(self.weight.detach()))
        return self._kernel_cache[1]


def set_winograd(model: nn.Module, enabled: bool) -> None:
    """Turn the Winograd path of every :class:`Conv3x3` in ``model`` on or off (off frees the cached kernels)."""
    for module in model.modules():
        if isinstance(module, Conv3x3):
            module.winograd = enabled
            if not enabled:
                module._kernel_cache = None
