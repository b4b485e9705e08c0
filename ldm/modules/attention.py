"""Cross-attention transformer used inside the UNet (Rombach et al. 2022, §3.3).

``SpatialTransformer`` flattens a feature map to tokens, runs ``BasicTransformerBlock``s
(self-attention, cross-attention on the text context, gated feed-forward) and adds the result back.
Attention is ``torch.nn.functional.scaled_dot_product_attention``: softmax(q·kᵀ/√d)·v, no mask.

A guided batch may pass each distinct ``x`` once, with the contexts of all its conditions (B·n rows for B rows of
``x``, ordered as ``torch.cat([x] * n)``): up to the first cross-attention nothing depends on the condition, so that
part is computed once and the tokens are tiled there (:func:`tile_batch`); the UNet does the same for its skips.

SD 2.x adds two options: ``use_linear`` (the transformer's in/out projections as linear layers on the tokens instead
of 1×1 convolutions: the same map, stored as (out, in) matrices) and ``upcast`` (attention in float32 for float16
weights; see :class:`CrossAttention`).
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint, zero_module


def tile_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``x`` (b, …) as ``batch`` rows, ``torch.cat([x] * (batch // b))``; ``x`` itself when it has them already."""
    return x if x.shape[0] == batch else x.repeat(batch // x.shape[0], *([1] * (x.dim() - 1)))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection split into a value half and a gate half, value · GELU(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to ``mult·dim`` hidden units, dropout, linear back to ``dim``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


FLOAT32_SCORE_DEVICES = ("cuda", "cpu")  # where SDPA accumulates q·kᵀ of float16 inputs in float32


def attends_in_float32(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether an upcasting :class:`CrossAttention` casts inputs of ``dtype`` on ``device`` to float32."""
    return dtype == torch.float16 and device.type not in FLOAT32_SCORE_DEVICES


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` on ``context`` (on ``x`` itself when no context is given).

    q, k, v projections have no bias; the output projection has one. x: (B, N, query_dim),
    context: (B, M, context_dim) → (B, N, query_dim).

    ``upcast``: attend in float32 where float16 scores could overflow. SD 2.1's activations make q·kᵀ exceed
    float16's 65 504 (the black-image failure of fp16 SD 2.1), and a kernel that forms the scores in float16 then
    gives inf/NaN. The original SD 2 code casts q and k to float32 before q·kᵀ on its plain attention path
    (``ATTN_PRECISION=fp32``, its default) and not on its xformers path, whose fused kernels accumulate in float32.
    Here PyTorch's SDPA kernels on CUDA and on the CPU (every backend, measured in the tests) accumulate the scores
    in float32 too, so nothing is cast there; on other devices (MPS) float16 inputs are attended in float32.
    bfloat16 has float32's range and is never cast.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, upcast: bool = False):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.query_slice = 0  # attend with at most this many query tokens at a time (0: all); see set_attention_slicing
        self.upcast = upcast

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (self._split_heads(proj(inp)) for proj, inp in
                   ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        dtype = q.dtype
        if self.upcast and attends_in_float32(dtype, q.device):
            q, k, v = q.float(), k.float(), v.float()
        if 0 < self.query_slice < q.shape[2]:
            out = torch.cat([F.scaled_dot_product_attention(q_slice, k, v)
                             for q_slice in q.split(self.query_slice, dim=2)], dim=2)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.to(dtype)
        batch, heads, tokens, dim_head = out.shape
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, heads * dim_head))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = t.shape
        return t.view(batch, tokens, self.heads, -1).transpose(1, 2)


class BasicTransformerBlock(nn.Module):
    """x += attn1(norm1 x); x += attn2(norm2 x, context); x += ff(norm3 x).

    A context with more rows than ``x`` (a guided batch passing ``x`` once) tiles ``x`` before the cross-attention,
    the first step that depends on the condition."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 use_checkpoint: bool = True, upcast: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout, upcast=upcast)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head,
                                    dropout=dropout, upcast=upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        if context is not None:
            x = tile_batch(x, context.shape[0])
        x = x + self.attn2(self.norm2(x), context=context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: GroupNorm, projection in, blocks, projection out, residual.

    The projections are 1×1 convolutions (SD v1) or, with ``use_linear``, linear layers applied to the tokens
    (SD 2.x). x: (B, C, H, W), context: (B, M, context_dim) → (B, C, H, W).

    Pixels become tokens by a 4-D permute to channels-last and a reshape (the same strided view as flatten + transpose,
    so torch computes the same numbers): OpenVINO folds the 4-D permute into the convolutions' layout and keeps the
    3-D transpose as a copy, 16 copies per SD v1 UNet step (measured: 48 → 32 runtime transposes, ~1 % of a step).
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None, use_checkpoint: bool = True, num_groups: int = 32,
                 use_linear: bool = False, upcast: bool = False):
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)
        projection = nn.Linear if use_linear else functools.partial(nn.Conv2d, kernel_size=1)
        self.proj_in = projection(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim,
                                  use_checkpoint=use_checkpoint, upcast=upcast)
            for _ in range(depth))
        self.proj_out = zero_module(projection(inner_dim, in_channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, -1)  # (B, C, H, W) → (B, H·W, C): see the docstring
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context=context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.reshape(h.shape[0], height, width, -1).permute(0, 3, 1, 2)  # B·n rows after a guided batch's tiling
        if not self.use_linear:
            h = self.proj_out(h)
        return h + tile_batch(x, h.shape[0])


def set_attention_slicing(model: nn.Module, query_tokens: int) -> None:
    """Compute every :class:`CrossAttention` in ``model`` over at most ``query_tokens`` queries at a time.

    Rows of softmax(q·kᵀ/√d)·v depend only on their own query, so slices give the same result; the attention
    matrix held at once shrinks to ``query_tokens`` rows (for kernels that hold it at all: the math path of
    small cards, MPS and older GPUs). 0 turns slicing off.
    """
    for module in model.modules():
        if isinstance(module, CrossAttention):
            module.query_slice = query_tokens
