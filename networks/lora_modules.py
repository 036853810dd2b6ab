"""The LoRA network kind: `LoRAModule` adapts one Linear / Conv2d, `FusedLoRAModule` one published layer that is
several of ours (FLUX's fused qkv); files hold `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`.

Used by networks.lora (SDXL) and networks.lora_flux (FLUX) through the kind registry (networks/kinds.py).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from networks import kohya_names as kn
from networks.kinds import NetworkKind, register_network_kind
from networks.targets import KEY_ALPHA, KEY_DOWN, KEY_UP


# --------------------------------------------------------------------------------------------------------------------
# One wrapped layer
# --------------------------------------------------------------------------------------------------------------------


class LoRAModule(nn.Module):
    """A low-rank update added to one Linear or Conv2d: `org(x) + up(down(x)) * multiplier * alpha / dim`.

    `up` starts at zero so an untrained module changes nothing; `down` gets kaiming-uniform init (as sd-scripts), so
    gradients reach `up` from the first step. For convs, `down` copies the layer's kernel, stride and padding and `up`
    is 1x1 (LoCon), which is what the published conv LoRA files contain.
    """

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        if isinstance(org_module, nn.Conv2d) and org_module.groups != 1:
            raise TypeError(f"{lora_name}: grouped convolutions are not supported")
        if isinstance(org_module, nn.Conv2d):
            self.lora_down = nn.Conv2d(org_module.in_channels, self.lora_dim, org_module.kernel_size,
                                       org_module.stride, org_module.padding, dilation=org_module.dilation,
                                       bias=False)
            self.lora_up = nn.Conv2d(self.lora_dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
        elif isinstance(org_module, nn.Linear):
            self.lora_down = nn.Linear(org_module.in_features, self.lora_dim, bias=False)
            self.lora_up = nn.Linear(self.lora_dim, org_module.out_features, bias=False)
        else:
            raise TypeError(f"{lora_name}: LoRA wraps Linear or Conv2d, got {type(org_module).__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

        alpha = float(self.lora_dim if alpha is None or alpha == 0 else alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.scale = alpha / self.lora_dim
        # The loaded alpha decides the scale: keep the cached float in step with the buffer.
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module.refresh_scale())

        self.multiplier = float(multiplier)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # A plain tuple so the wrapped layer is not registered as a child (its weights stay out of our state dict).
        self._org = (org_module,)
        self._org_forward = None
        self._had_instance_forward = False

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    @property
    def is_applied(self) -> bool:
        return self._org_forward is not None

    def refresh_scale(self) -> None:
        self.scale = float(self.alpha.item()) / self.lora_dim

    def apply_to(self) -> None:
        """Route the wrapped layer's calls through this module."""
        if self.is_applied:
            return
        org = self.org_module
        self._had_instance_forward = "forward" in org.__dict__
        self._org_forward = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        """Give the wrapped layer its own forward back."""
        if not self.is_applied:
            return
        org = self.org_module
        if self._had_instance_forward:
            org.forward = self._org_forward
        else:
            del org.forward
        self._org_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._org_forward is None:
            raise RuntimeError(f"{self.lora_name}: call apply_to() before using the module")
        org_out = self._org_forward(x)
        if self.module_dropout and self.training and torch.rand(1).item() < self.module_dropout:
            return org_out
        # under autocast the matmul runs in the autocast dtype anyway: casting x to the (fp32) LoRA dtype first would
        # only add a full copy of every wrapped layer's input
        lx = self.lora_down(x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_down.weight.dtype))
        if self.dropout and self.training:
            lx = nn.functional.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout and self.training:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:  # (batch, tokens, rank)
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:  # (batch, rank, h, w)
                mask = mask.unsqueeze(-1).unsqueeze(-1)
            lx = lx * mask.to(lx.dtype)
            scale = scale / (1.0 - self.rank_dropout)  # keep the expected update unchanged
        lx = self.lora_up(lx)
        return org_out + (lx * (self.multiplier * scale)).to(org_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update `up @ down * scale` in the wrapped layer's weight shape (float32), for merging and max-norm."""
        down = self.lora_down.weight.float()
        up = self.lora_up.weight.float()
        if down.dim() == 2:
            delta = up @ down
        elif down.shape[2:] == (1, 1):
            delta = (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
        else:  # kxk down, 1x1 up: out[o, i] = sum_r up[o, r] * down[r, i]
            delta = torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
        return delta * self.scale

    @torch.no_grad()
    def merge_into_org(self, multiplier: float | None = None, device: torch.device | str | None = None) -> None:
        """Add the update to the wrapped layer's weight (in float32, stored back in the layer's dtype)."""
        self.restore()
        weight = self.org_module.weight
        mult = self.multiplier if multiplier is None else float(multiplier)
        work_device = torch.device(device) if device is not None else weight.device
        delta = self.delta_weight().to(work_device) * mult
        merged = weight.to(work_device, torch.float32) + delta
        weight.copy_(merged.to(weight.device, weight.dtype))


# --------------------------------------------------------------------------------------------------------------------
# One fused module over several layers
# --------------------------------------------------------------------------------------------------------------------


class FusedLoRAModule(LoRAModule):
    """A LoRA over several Linears that share their input (BFL's fused qkv / linear1), stored as one module.

    The update of member j is `up[rows_j] @ down @ x`. Members are called separately by diffusers with the same input
    tensor; `down(x)` is computed once and reused by the other members of that call (same tensor object), so the
    cost and the dropout draws are those of one fused layer.
    """

    def __init__(self, lora_name: str, members: Sequence[nn.Linear], multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, split: bool = False):
        in_features = members[0].in_features
        if any(not isinstance(m, nn.Linear) or m.in_features != in_features for m in members):
            raise TypeError(f"{lora_name}: fused members must be Linear layers with the same input size")
        sizes = [m.out_features for m in members]
        n = len(members)
        alpha = float(lora_dim if alpha is None or alpha == 0 else alpha)
        rank, stored_alpha = (lora_dim * n, alpha * n) if split else (lora_dim, alpha)
        placeholder = nn.Linear(in_features, sum(sizes), bias=False, device="meta")  # shapes only
        super().__init__(lora_name, placeholder, multiplier, rank, stored_alpha, dropout, rank_dropout, module_dropout)
        self._members = tuple(members)
        self.sizes = sizes
        self.offsets = [sum(sizes[:j]) for j in range(n)]
        self.split = split
        if split:  # block-diagonal up: part j only sees its own r ranks
            mask = torch.zeros(sum(sizes), rank)
            for j in range(n):
                mask[self.offsets[j]:self.offsets[j] + sizes[j], j * lora_dim:(j + 1) * lora_dim] = 1.0
            self.register_buffer("up_mask", mask, persistent=False)
        else:
            self.up_mask = None
        self._member_forwards: list[Any] | None = None
        self._had_instance: list[bool] = []
        self._cache: tuple[torch.Tensor, torch.Tensor, int] | None = None

    @property
    def members(self) -> tuple[nn.Linear, ...]:
        return self._members

    @property
    def is_applied(self) -> bool:
        return self._member_forwards is not None

    def apply_to(self) -> None:
        if self.is_applied:
            return
        self._had_instance = ["forward" in m.__dict__ for m in self._members]
        self._member_forwards = [m.forward for m in self._members]
        for j, m in enumerate(self._members):
            m.forward = (lambda x, j=j: self.member_forward(j, x))

    def restore(self) -> None:
        if not self.is_applied:
            return
        for m, had, fwd in zip(self._members, self._had_instance, self._member_forwards or []):
            if had:
                m.forward = fwd
            else:
                del m.forward
        self._member_forwards = None
        self._cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fused layer: all members' outputs concatenated (what BFL's qkv / linear1 would return)."""
        return torch.cat([self.member_forward(j, x) for j in range(len(self._members))], dim=-1)

    def _up_weight(self) -> torch.Tensor:
        w = self.lora_up.weight
        return w * self.up_mask.to(w.dtype) if self.up_mask is not None else w

    def _down(self, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """(down(x) after dropouts, scale), shared by the members called with this `x`; None = module dropped."""
        if self._cache is not None and self._cache[0] is x:
            _, lx, left = self._cache
            self._cache = (x, lx, left - 1) if left > 1 else None
            return (lx, self._cache_scale) if lx is not None else None
        scale = self.scale
        lx: torch.Tensor | None
        if self.module_dropout and self.training and torch.rand(1).item() < self.module_dropout:
            lx = None
        else:
            lx = self.lora_down(x.to(self.lora_down.weight.dtype))
            if self.dropout and self.training:
                lx = F.dropout(lx, p=self.dropout)
            if self.rank_dropout and self.training:
                mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
                if lx.dim() == 3:
                    mask = mask.unsqueeze(1)
                lx = lx * mask.to(lx.dtype)
                scale = scale / (1.0 - self.rank_dropout)
        self._cache_scale = scale
        n = len(self._members)
        self._cache = (x, lx, n - 1) if n > 1 else None  # type: ignore[assignment]
        return (lx, scale) if lx is not None else None

    def member_forward(self, j: int, x: torch.Tensor) -> torch.Tensor:
        if self._member_forwards is None:
            raise RuntimeError(f"{self.lora_name}: call apply_to() before using the module")
        org_out = self._member_forwards[j](x)
        down = self._down(x)
        if down is None:
            return org_out
        lx, scale = down
        rows = self._up_weight()[self.offsets[j]:self.offsets[j] + self.sizes[j]]
        return org_out + (F.linear(lx, rows) * (self.multiplier * scale)).to(org_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self._up_weight().float() @ self.lora_down.weight.float()) * self.scale

    @torch.no_grad()
    def merge_into_org(self, multiplier: float | None = None, device: torch.device | str | None = None) -> None:
        self.restore()
        mult = self.multiplier if multiplier is None else float(multiplier)
        delta = self.delta_weight() * mult
        for m, off, size in zip(self._members, self.offsets, self.sizes):
            work = torch.device(device) if device is not None else m.weight.device
            merged = m.weight.to(work, torch.float32) + delta[off:off + size].to(work)
            m.weight.copy_(merged.to(m.weight.device, m.weight.dtype))


LORA_KIND = register_network_kind(NetworkKind(
    name="lora", module_class=LoRAModule, read_shapes=kn.infer_dims_and_alphas,
    tensor_keys=(KEY_DOWN, KEY_UP, KEY_ALPHA), fused_module_class=FusedLoRAModule,
))

__all__ = ["FusedLoRAModule", "LORA_KIND", "LoRAModule"]
