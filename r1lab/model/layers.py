"""Small building blocks: RMSNorm, rotary embedding with YaRN, the SwiGLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, yarn_mscale


class KeepFP32Buffers(nn.Module):
    """Mixin: buffers named in `fp32_buffers` stay fp32 when the module is cast (`model.to(torch.bfloat16)`).

    The router's correction bias moves in steps of ~1e-3 and RoPE frequencies multiply positions up to 1e5:
    bf16's 8 bits of mantissa would erase both.
    """

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        saved = {n: self._buffers[n] for n in self.fp32_buffers if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, old in saved.items():
            new = self._buffers[n]
            if new.dtype != torch.float32:
                self._buffers[n] = (torch.empty_like(new, dtype=torch.float32) if old.is_meta or new.is_meta
                                    else old.to(device=new.device, dtype=torch.float32))
        return self


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back, then scaled (the order DeepSeek's checkpoints were trained with)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for dense layers and the shared experts."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the `qk_rope_head_dim` rotary channels, and the factor applied to cos/sin.

    With YaRN (Peng et al. 2023, as DeepSeek-V2/V3 use it), frequencies whose wavelength fits many times
    in the original context keep their value (extrapolation), long-wavelength ones are divided by `factor`
    (interpolation), and a linear ramp between `beta_slow` and `beta_fast` rotations blends the two.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    # fp32 like the reference implementations, so angles at long positions agree to the last bit
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = cfg.rope_scaling
    if not rs or rs.get("type") != "yarn":
        return inv_freq, 1.0
    factor = rs["factor"]
    orig = rs.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # channel index whose wavelength gives `rotations` turns
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    # Scale on cos/sin: mscale/mscale_all_dim (1 for V2/V3, which put the whole correction in the softmax scale).
    if rs.get("attention_factor") is not None:
        att = float(rs["attention_factor"])
    elif rs.get("mscale") and rs.get("mscale_all_dim"):
        att = yarn_mscale(factor, rs["mscale"]) / yarn_mscale(factor, rs["mscale_all_dim"])
    else:
        att = yarn_mscale(factor)
    return inv_freq, att


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape positions.shape + (rope_dim/2,), in fp32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x0, x1), (x2, x3), ... as the DeepSeek checkpoints lay them out.

    x: (B, S, [heads,] R); cos/sin: (B, S, R/2). Computed in fp32; returns x's dtype, pairs still interleaved.
    """
    if x.dim() == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.float().unflatten(-1, (-1, 2))  # (..., R/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
