"""ControlNet-LLLite for a diffusers SDXL U-Net, reading and writing the published kohya-ss weight files.

LLLite attaches one small control module to each targeted `Linear` of the U-Net's attention layers. Every module
owns a conditioning stack (`conditioning1`) that turns the control image into an embedding at the latent resolution
of its depth, and a bottleneck (`down` -> concat with the embedding -> `mid` -> `up`) whose output is added to the
*input* of the wrapped linear:  linear(x + up(mid(cat[cond_emb, down(x)])) * multiplier).

Compatibility with published files (kohya-ss/sd-scripts `networks/control_net_lllite.py`) decides the layout:
module names are `lllite_unet_` + the SGM (original Stability) U-Net path with dots as underscores, the targets are
attn1 to_q/to_k/to_v and attn2 to_q of the transformer blocks in the input blocks and the middle block, and the
conditioning image enters `conditioning1` in [-1, 1] (sd-scripts normalises both its training images and its
generation guide images that way). Our datasets hand over [0, 1] images; `set_cond_image` converts them.
See docs/lllite_format.md for the key layout.

Two deliberate differences from sd-scripts, neither visible in the files:
- `up` is zero-initialised including its bias (sd-scripts zeroes only the weight), so an untrained network is an exact
  identity.
- The control enters through a forward pre-hook on the wrapped linear instead of a replaced `forward`, so the U-Net's
  modules, parameter names and state dict stay untouched and the hook is removable.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from library.errors import ModelLoadError, UserError
from library.fileio import save_safetensors_atomic
from library.models.sdxl_unet_names import diffusers_to_sgm

LLLITE_PREFIX = "lllite_unet"

# Linear layers (by the end of their path inside a transformer block) that get a module. attn2's to_k/to_v read the
# text embedding, not the image tokens, so the image-shaped control cannot be added there.
TARGET_SUFFIXES: tuple[str, ...] = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q")

# Conditioning stack per depth: (kernel size = stride, output channels as a fraction of cond_emb_dim) for each conv,
# with a ReLU between consecutive convs. The product of the strides brings the pixel image to the latent resolution
# of that depth: 8 (depth 1), 16 (depth 2), 32 (depth 3). Keys follow the Sequential indices: convs at 0, 2, 4.
CONDITIONING_CONVS: dict[int, tuple[tuple[int, float], ...]] = {
    1: ((4, 0.5), (2, 1.0)),
    2: ((4, 0.5), (4, 1.0)),
    3: ((4, 0.5), (4, 0.5), (2, 1.0)),
}

# The value range that `conditioning1` of published weights was trained on, and the one our datasets deliver.
PUBLISHED_COND_RANGE = (-1.0, 1.0)
DATASET_COND_RANGE = (0.0, 1.0)
_RANGE_TOLERANCE = 1e-3


class LLLiteError(UserError):
    """LLLite weights or inputs do not fit the network (wrong file, wrong dims, wrong image size or range)."""


def depth_of(sgm_path: str) -> int:
    """Resolution depth (1 = latent size, 2 = /2, 3 = /4) of an SGM U-Net path, as sd-scripts assigns it."""
    parts = sgm_path.split(".")
    block = parts[0]
    if block == "middle_block":
        return 3
    index = int(parts[1])
    if block == "input_blocks":
        return 1 if index <= 2 else (2 if index <= 5 else 3)
    if block == "output_blocks":
        depth = 3 if index <= 2 else (2 if index <= 5 else 1)
        if int(parts[2]) >= 2:  # an upsampler's sub-module already works at the next, larger resolution
            depth -= 1
        return depth
    raise ValueError(f"not an SGM U-Net block path: {sgm_path}")


def lllite_name(sgm_path: str) -> str:
    """Published module name for an SGM module path: `lllite_unet_` + path with dots as underscores."""
    return f"{LLLITE_PREFIX}_" + sgm_path.replace(".", "_")


def find_targets(unet: nn.Module, include_output_blocks: bool = False) -> list[tuple[str, str, nn.Linear]]:
    """(diffusers path, SGM path, linear) for every Linear that gets an LLLite module, in U-Net order."""
    targets = []
    for path, module in unet.named_modules():
        if not isinstance(module, nn.Linear) or ".transformer_blocks." not in path:
            continue
        if not path.endswith(TARGET_SUFFIXES):
            continue
        try:
            sgm_path = diffusers_to_sgm(path)
        except KeyError as err:
            raise ModelLoadError(
                f"ControlNet-LLLite: U-Net module '{path}' has no SGM name; is this an SDXL-layout U-Net?"
            ) from err
        if sgm_path.startswith("output_blocks") and not include_output_blocks:
            continue
        targets.append((path, sgm_path, module))
    return targets


def _conditioning_stack(depth: int, cond_emb_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for i, (k, frac) in enumerate(CONDITIONING_CONVS[depth]):
        if i > 0:
            layers.append(nn.ReLU(inplace=True))
        out_ch = int(cond_emb_dim * frac)
        layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=k, stride=k, padding=0))
        in_ch = out_ch
    return nn.Sequential(*layers)


class LLLiteModule(nn.Module):
    """The control for one wrapped Linear. The wrapped module is kept outside the registered children so that it
    never appears in this module's parameters or state dict."""

    def __init__(
        self,
        name: str,
        org_module: nn.Linear,
        depth: int,
        cond_emb_dim: int,
        network_dim: int,
        dropout: float = 0.0,
        multiplier: float = 1.0,
    ):
        super().__init__()
        self.lllite_name = name
        self.depth = depth
        self.cond_emb_dim = cond_emb_dim
        self.network_dim = network_dim
        self.dropout = dropout
        self.multiplier = multiplier
        self._org = [org_module]  # a list, so not registered as a child
        in_dim = org_module.in_features

        self.conditioning1 = _conditioning_stack(depth, cond_emb_dim)
        self.down = nn.Sequential(nn.Linear(in_dim, network_dim), nn.ReLU(inplace=True))
        self.mid = nn.Sequential(nn.Linear(network_dim + cond_emb_dim, network_dim), nn.ReLU(inplace=True))
        self.up = nn.Sequential(nn.Linear(network_dim, in_dim))
        nn.init.zeros_(self.up[0].weight)
        nn.init.zeros_(self.up[0].bias)

        self.cond_emb: torch.Tensor | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    @property
    def org_module(self) -> nn.Linear:
        return self._org[0]

    def set_cond_image(self, cond_image: torch.Tensor | None) -> None:
        """Embed an image already in the published range [-1, 1] as tokens (B, h*w, cond_emb_dim); None clears."""
        if cond_image is None:
            self.cond_emb = None
            return
        weight = self.conditioning1[0].weight
        emb = self.conditioning1(cond_image.to(device=weight.device, dtype=weight.dtype))
        b, c, h, w = emb.shape
        self.cond_emb = emb.reshape(b, c, h * w).permute(0, 2, 1)

    def control(self, x: torch.Tensor) -> torch.Tensor:
        """The residual added to the wrapped linear's input, in x's dtype."""
        cx = self.cond_emb
        assert cx is not None
        if x.dim() != 3:
            raise LLLiteError(f"{self.lllite_name}: expected tokens (batch, tokens, channels), got shape {tuple(x.shape)}")
        if x.shape[0] != cx.shape[0]:
            if x.shape[0] % cx.shape[0] != 0:
                raise LLLiteError(
                    f"{self.lllite_name}: U-Net batch {x.shape[0]} is not a multiple of the conditioning image batch "
                    f"{cx.shape[0]}"
                )
            # classifier-free guidance: the U-Net batch is [uncond..., cond...], each a copy of the image batch
            cx = cx.repeat(x.shape[0] // cx.shape[0], 1, 1)
        if x.shape[1] != cx.shape[1]:
            raise LLLiteError(
                f"{self.lllite_name}: the conditioning image gives {cx.shape[1]} tokens at depth {self.depth} but the "
                f"U-Net has {x.shape[1]}; the conditioning image must have the pixel size of the generated image "
                f"(8x the latent size, a multiple of 32)"
            )
        h = self.down(x.to(self.down[0].weight.dtype))
        h = self.mid(torch.cat([cx.to(h.dtype), h], dim=2))
        if self.dropout and self.training:
            h = nn.functional.dropout(h, p=self.dropout)
        return (self.up(h) * self.multiplier).to(x.dtype)

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self.cond_emb is None or self.multiplier == 0.0 or not args:
            return None
        x = args[0]
        return (x + self.control(x),) + tuple(args[1:])

    def apply_to(self) -> None:
        if self._hook is None:
            self._hook = self.org_module.register_forward_pre_hook(self._pre_hook)

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def infer_dims_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(cond_emb_dim, network_dim) of an LLLite state dict, from any module's `down` and `mid` weights:
    down.0.weight is (network_dim, in_dim), mid.0.weight is (network_dim, network_dim + cond_emb_dim)."""
    for key, tensor in state_dict.items():
        if key.endswith(".mid.0.weight"):
            network_dim = int(tensor.shape[0])
            cond_emb_dim = int(tensor.shape[1]) - network_dim
            if cond_emb_dim <= 0:
                break
            return cond_emb_dim, network_dim
    raise LLLiteError("not a ControlNet-LLLite state dict: no '<module>.mid.0.weight' key with a valid shape")


def _read_state_dict(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = os.fspath(file)
    if not os.path.isfile(path):
        raise ModelLoadError(f"ControlNet-LLLite weights not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or foreign file: say which one
        raise ModelLoadError(f"cannot read ControlNet-LLLite weights {path}: {err}") from err


def _examples(keys: Iterable[str], n: int = 3) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


class ControlNetLLLite(nn.Module):
    """All LLLite modules for one U-Net. The modules are registered under their published names, so `state_dict()`
    is the published file layout. The U-Net itself is not registered: its weights never enter our parameters."""

    def __init__(
        self,
        unet: nn.Module,
        cond_emb_dim: int = 32,
        network_dim: int = 64,
        dropout: float = 0.0,
        multiplier: float = 1.0,
        include_output_blocks: bool = False,
    ):
        super().__init__()
        if cond_emb_dim < 2 or cond_emb_dim % 2:
            raise LLLiteError(f"ControlNet-LLLite: cond_emb_dim must be an even number >= 2, got {cond_emb_dim}")
        if network_dim < 1:
            raise LLLiteError(f"ControlNet-LLLite: network_dim must be >= 1, got {network_dim}")
        if not 0.0 <= dropout < 1.0:
            raise LLLiteError(f"ControlNet-LLLite: dropout must be in [0, 1), got {dropout}")
        self.cond_emb_dim = cond_emb_dim
        self.network_dim = network_dim
        self.include_output_blocks = include_output_blocks
        self.unet_modules: list[LLLiteModule] = []
        for _, sgm_path, linear in find_targets(unet, include_output_blocks):
            name = lllite_name(sgm_path)
            module = LLLiteModule(name, linear, depth_of(sgm_path), cond_emb_dim, network_dim, dropout, multiplier)
            self.add_module(name, module)
            self.unet_modules.append(module)
        if not self.unet_modules:
            raise ModelLoadError("ControlNet-LLLite: the U-Net has no attention layers to control")

    def forward(self, x: Any) -> Any:
        """Unused: the control runs inside the U-Net through hooks. Present so wrappers that call forward work."""
        return x

    # --- wiring -------------------------------------------------------------------------------------------------
    def apply_to(self) -> None:
        """Hook every module into its U-Net linear. Idempotent; the U-Net's modules and names stay as they are."""
        for module in self.unet_modules:
            module.apply_to()

    def remove_from(self) -> None:
        """Undo `apply_to`: the U-Net behaves as if LLLite had never been attached."""
        for module in self.unet_modules:
            module.remove()

    def set_cond_image(self, cond: torch.Tensor | None) -> None:
        """Embed the conditioning images once for all following U-Net calls (one training step, one generation).

        `cond` is float [B, 3, H, W] in [0, 1] (RGB, the pixel size of the image being trained or generated); it
        is converted here to the [-1, 1] the published weights expect. Gradients flow when grad is enabled, so call
        it under torch.no_grad() for generation. None clears the control (the U-Net is then unchanged).
        """
        if cond is None:
            for module in self.unet_modules:
                module.set_cond_image(None)
            return
        self._check_cond(cond)
        lo, hi = PUBLISHED_COND_RANGE
        cond = cond * (hi - lo) + lo
        for module in self.unet_modules:
            module.set_cond_image(cond)

    @staticmethod
    def _check_cond(cond: torch.Tensor) -> None:
        if not isinstance(cond, torch.Tensor) or cond.dim() != 4 or cond.shape[1] != 3:
            shape = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise LLLiteError(f"ControlNet-LLLite: conditioning image must be a [B, 3, H, W] tensor, got {shape}")
        if not cond.is_floating_point():
            raise LLLiteError(
                f"ControlNet-LLLite: conditioning image must be a float tensor in [0, 1], got dtype {cond.dtype}"
            )
        h, w = cond.shape[-2:]
        if h % 32 or w % 32:
            raise LLLiteError(f"ControlNet-LLLite: conditioning image size {w}x{h} must be a multiple of 32")
        lo, hi = float(cond.min()), float(cond.max())
        if lo < DATASET_COND_RANGE[0] - _RANGE_TOLERANCE or hi > DATASET_COND_RANGE[1] + _RANGE_TOLERANCE:
            raise LLLiteError(
                f"ControlNet-LLLite: conditioning image values must be in [0, 1], got [{lo:.3f}, {hi:.3f}] "
                f"(pass the image before any [-1, 1] normalisation; the network converts it)"
            )

    def set_multiplier(self, multiplier: float) -> None:
        for module in self.unet_modules:
            module.multiplier = multiplier

    # --- training interface -------------------------------------------------------------------------------------
    def prepare_optimizer_params(self, lr: float | None = None) -> list[dict[str, Any]]:
        """One parameter group with every LLLite parameter (and nothing of the U-Net)."""
        self.requires_grad_(True)
        group: dict[str, Any] = {"params": list(self.parameters())}
        if lr is not None:
            group["lr"] = lr
        return [group]

    def get_trainable_params(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to checkpoint: the modules are tiny; the U-Net's own checkpointing covers the rest."""

    def prepare_grad_etc(self) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self) -> None:
        self.train()

    def is_mergeable(self) -> bool:
        return False

    # --- files --------------------------------------------------------------------------------------------------
    def save_weights(
        self, file: str | os.PathLike, dtype: torch.dtype | None = None, metadata: Mapping[str, Any] | None = None
    ) -> None:
        """Write the published layout as safetensors, atomically (temp file in the same folder + os.replace)."""
        path = os.fspath(file)
        state = {}
        for key, tensor in self.state_dict().items():
            tensor = tensor.detach().to("cpu")
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state[key] = tensor.contiguous()
        meta = {str(k): str(v) for k, v in metadata.items()} if metadata else None
        save_safetensors_atomic(state, path, meta)

    def load_weights(self, file: str | os.PathLike) -> None:
        """Load a published or our own LLLite file strictly: every key present, none extra, every shape equal."""
        self.load_lllite_state_dict(_read_state_dict(file), source=os.fspath(file))

    def load_lllite_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        expected = self.state_dict()
        missing = set(expected) - set(state_dict)
        unexpected = set(state_dict) - set(expected)
        if missing or unexpected:
            parts = [f"{source}: ControlNet-LLLite weights do not fit this U-Net:"]
            if missing:
                parts.append(f"{len(missing)} missing keys (e.g. {_examples(missing)})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys (e.g. {_examples(unexpected)})")
            if unexpected and not any(k.startswith(LLLITE_PREFIX + "_") for k in unexpected):
                parts.append("- this does not look like a ControlNet-LLLite file")
            elif any(k.startswith(LLLITE_PREFIX + "_output_blocks") for k in unexpected):
                parts.append("- the file also controls output blocks: create the network with include_output_blocks")
            raise LLLiteError(" ".join(parts))
        for key, tensor in expected.items():
            if tuple(state_dict[key].shape) != tuple(tensor.shape):
                try:
                    dims = "the file has cond_emb_dim=%d, network_dim=%d" % infer_dims_from_state_dict(state_dict)
                except LLLiteError:
                    dims = "the file's dims cannot be read"
                raise LLLiteError(
                    f"{source}: ControlNet-LLLite key '{key}' has shape {tuple(state_dict[key].shape)}, expected "
                    f"{tuple(tensor.shape)}; {dims}, this network has cond_emb_dim={self.cond_emb_dim}, "
                    f"network_dim={self.network_dim}"
                )
        with torch.no_grad():
            self.load_state_dict(dict(state_dict), strict=True)

    infer_dims_from_state_dict = staticmethod(infer_dims_from_state_dict)


def create_network(
    unet: nn.Module,
    cond_emb_dim: int = 32,
    network_dim: int = 64,
    dropout: float = 0.0,
    multiplier: float = 1.0,
    include_output_blocks: bool = False,
) -> ControlNetLLLite:
    """A fresh (identity) network for `unet`; call `apply_to()` to attach it."""
    return ControlNetLLLite(unet, cond_emb_dim, network_dim, dropout, multiplier, include_output_blocks)


def create_network_from_weights(
    unet: nn.Module, file: str | os.PathLike, multiplier: float = 1.0, dropout: float = 0.0
) -> ControlNetLLLite:
    """A network shaped like the file (dims and output-block coverage read from its keys), loaded strictly.
    Not attached yet: call `apply_to()`."""
    state_dict = _read_state_dict(file)
    cond_emb_dim, network_dim = infer_dims_from_state_dict(state_dict)
    include_output = any(k.startswith(LLLITE_PREFIX + "_output_blocks") for k in state_dict)
    network = ControlNetLLLite(unet, cond_emb_dim, network_dim, dropout, multiplier, include_output)
    network.load_lllite_state_dict(state_dict, source=os.fspath(file))
    return network
