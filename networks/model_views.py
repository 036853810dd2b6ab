"""The models as sd-scripts shows them to network modules, built over our diffusers models without copying weights.

Third-party network modules (LyCORIS' `lycoris.kohya`, ...) name their modules after the module tree they are handed
(`lora_unet_` + path with dots as underscores) and choose layers by the *class names* of containers
(`Transformer2DModel`, `ResnetBlock2D`, `Downsample2D`, `Upsample2D`, FLUX's `DoubleStreamBlock` / `SingleStreamBlock`).
Under sd-scripts they see the SGM SDXL U-Net, BFL's FLUX model and transformers-4 CLIP (with its `text_model`
wrapper). We run diffusers / transformers-5 models, so handing those over gives other names, other class names and,
for FLUX, separate q/k/v layers where published files have one fused `qkv`.

A *view* is a tree of empty container modules (`ViewNode`, with the class name sd-scripts' model has at that place)
whose leaves are our model's own `Linear` / `Conv2d` / norm modules: the same objects, not copies. A network module
that hooks a leaf (replaces its `forward`, reads its `weight`) therefore changes our model. The view itself is never
run.

Where BFL fuses layers that diffusers keeps apart (`img_attn.qkv` = to_q/to_k/to_v; single blocks' `linear1` =
q/k/v + MLP input), the view holds a `FusedLinear`: a `Linear` whose output and weight are those of its members
concatenated. While nothing is hooked into it, each member runs as itself (bit-identical). Once a network module has
replaced the fused layer's `forward`, the members' calls go through it: the first member called with an input runs
the (hooked) fused layer once and the others take their rows of that output, so the published fused module is
trained and applied exactly as it would be on BFL's model. Its `weight` is concatenated on access (a temporary, no
stored copy); `materialized_fused_weights` gives merging a real tensor to write into and copies it back.

Which view a model gets is looked up by its class name (`register_model_view`): adding a family is one entry.
"""
from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from library.models import flux_keys
from library.models.sdxl_unet_names import diffusers_to_sgm

if TYPE_CHECKING:
    from networks.protocol import TextEncoders

# ------------------------------------------------------------------------------------------------------ view nodes


class ViewNode(nn.Module):
    """A container of a model view: it only names the real layers below it."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{type(self).__name__} is part of a model view (names only): run the model itself")


_NODE_CLASSES: dict[str, type[ViewNode]] = {}


def view_node(class_name: str) -> ViewNode:
    """An empty container whose class is called `class_name` (what network modules match on)."""
    cls = _NODE_CLASSES.get(class_name)
    if cls is None:
        cls = type(class_name, (ViewNode,), {"__module__": __name__,
                                             "__doc__": f"View container standing for sd-scripts' {class_name}."})
        _NODE_CLASSES[class_name] = cls
    return cls()


def _natural_key(path: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def build_view(leaves: Iterable[tuple[str, nn.Module]], class_of: Callable[[str], str],
               root_class: str) -> ViewNode:
    """A tree holding each (path, module) at its path; the containers in between are `ViewNode`s named by
    `class_of(container path)`. Paths are inserted in natural order (input_blocks.2 before input_blocks.10)."""
    root = view_node(root_class)
    for path, module in sorted(leaves, key=lambda item: _natural_key(item[0])):
        parts = path.split(".")
        parent: nn.Module = root
        for i, part in enumerate(parts[:-1]):
            child = parent._modules.get(part)
            if child is None:
                child = view_node(class_of(".".join(parts[:i + 1])))
                parent.add_module(part, child)
            parent = child
        parent.add_module(parts[-1], module)
    return root


# --------------------------------------------------------------------------------------------------- fused layers


class FusedLinear(nn.Linear):
    """BFL's fused Linear over several of our Linears that share their input (see the module docstring).

    The class is *named* `Linear` (below): LyCORIS treats any Linear subclass with another name as a quantized layer
    and forces its bypass mode, which refuses algo=full. This layer is a plain Linear in every respect it checks.
    """

    def __init__(self, members: Sequence[nn.Linear]):
        nn.Module.__init__(self)
        if not members or any(not isinstance(m, nn.Linear) or m.in_features != members[0].in_features
                              for m in members):
            raise TypeError("fused members must be Linear layers with the same input size")
        self.in_features = members[0].in_features
        self.sizes = [m.out_features for m in members]
        self.offsets = [sum(self.sizes[:j]) for j in range(len(members))]
        self.out_features = sum(self.sizes)
        self._members = tuple(members)  # a tuple: the members stay children of our model only
        self._member_forwards = [m.forward for m in members]
        self._had_instance_forward = ["forward" in m.__dict__ for m in members]
        self._hidden: set[str] = set()
        self._materialized: dict[str, torch.Tensor] = {}
        self._cache: tuple[torch.Tensor, torch.Tensor, int] | None = None
        for j, m in enumerate(members):
            m.forward = (lambda x, j=j: self._member_call(j, x))

    # ---- attributes a network module reads and writes (weight, bias) ----------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in ("weight", "bias"):
            if name in self._hidden:
                raise AttributeError(name)
            if name in self._materialized:
                return self._materialized[name]
            tensors = [getattr(m, name) for m in self._members]
            if name == "bias" and all(t is None for t in tensors):
                return None
            if any(t is None for t in tensors):
                raise AttributeError(f"{name}: only some fused members have one")
            return torch.cat(tensors, dim=0)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("weight", "bias") and "_members" in self.__dict__:
            # e.g. LyCORIS' algo=full restoring the layer: write the rows back into the members
            self._hidden.discard(name)
            if value is not None:
                self._write_back(name, value)
            return
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in ("weight", "bias") and "_members" in self.__dict__:
            self._hidden.add(name)  # LyCORIS' algo=full takes the weight over; the members keep theirs
            return
        super().__delattr__(name)

    @torch.no_grad()
    def _write_back(self, name: str, value: torch.Tensor) -> None:
        for m, off, size in zip(self._members, self.offsets, self.sizes):
            target = getattr(m, name)
            if target is not None:
                target.copy_(value[off:off + size].to(target.device, target.dtype))

    @contextlib.contextmanager
    def materialized(self) -> Iterator[None]:
        """`weight` / `bias` are real tensors while inside (for in-place merging), copied into the members after."""
        self._materialized = {"weight": self.weight.detach().clone()}
        if self.bias is not None:
            self._materialized["bias"] = self.bias.detach().clone()
        try:
            yield
        finally:
            tensors, self._materialized = self._materialized, {}
            for name, value in tensors.items():
                self._write_back(name, value)

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fused layer itself: the members' own outputs, concatenated."""
        return torch.cat([f(x) for f in self._member_forwards], dim=-1)

    @property
    def hooked(self) -> bool:
        """Whether a network module replaced this layer's forward."""
        fwd = self.__dict__.get("forward")
        return fwd is not None and getattr(fwd, "__func__", None) is not FusedLinear.forward

    def _member_call(self, j: int, x: torch.Tensor) -> torch.Tensor:
        if not self.hooked:
            return self._member_forwards[j](x)
        cache = self._cache
        if cache is not None and cache[0] is x:
            out, left = cache[1], cache[2] - 1
            self._cache = (x, out, left) if left > 0 else None
        else:
            out = self(x)
            n = len(self._members)
            self._cache = (x, out, n - 1) if n > 1 else None
        return out[..., self.offsets[j]:self.offsets[j] + self.sizes[j]]

    def release(self) -> None:
        """Give the members their own forward back (the view is no longer used)."""
        for m, had, fwd in zip(self._members, self._had_instance_forward, self._member_forwards):
            if had:
                m.forward = fwd
            else:
                m.__dict__.pop("forward", None)
        self._cache = None


FusedLinear.__name__ = "Linear"


@contextlib.contextmanager
def materialized_fused_weights(view: nn.Module | None) -> Iterator[None]:
    """Inside, every fused layer of `view` has real `weight` / `bias` tensors; on exit they go back to the members.
    Network modules that merge by writing into `layer.weight` need this."""
    with contextlib.ExitStack() as stack:
        if view is not None:
            for module in view.modules():
                if isinstance(module, FusedLinear):
                    stack.enter_context(module.materialized())
        yield


def release_view(view: nn.Module | None) -> None:
    """Undo what building `view` did to our model (member forwards of fused layers)."""
    if view is None:
        return
    for module in view.modules():
        if isinstance(module, FusedLinear):
            module.release()


# ------------------------------------------------------------------------------------------------------------ SDXL

# diffusers container class -> the class sd-scripts' SGM U-Net (library/sdxl_original_unet.py) has at that place.
SGM_CONTAINER_CLASSES: dict[str, str] = {
    "Transformer2DModel": "Transformer2DModel",
    "BasicTransformerBlock": "BasicTransformerBlock",
    "Attention": "CrossAttention",
    "FeedForward": "FeedForward",
    "GEGLU": "GEGLU",
    "ResnetBlock2D": "ResnetBlock2D",
    "Downsample2D": "Downsample2D",
    "Upsample2D": "Upsample2D",
    "ModuleList": "ModuleList",
    "TimestepEmbedding": "Sequential",
}
# SGM-only containers (input_blocks.4, in_layers, time_embed, ...): plain torch containers there.
SGM_DEFAULT_CONTAINER = "Sequential"


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def sgm_unet_view(unet: nn.Module) -> ViewNode:
    """The SDXL U-Net as sd-scripts' `SdxlUNet2DConditionModel`: SGM paths (`input_blocks.4.1.transformer_blocks.0.
    attn1.to_q`) and SGM container classes, over the diffusers U-Net's own layers."""
    leaves: list[tuple[str, nn.Module]] = []
    classes: dict[str, str] = {}
    for path, module in unet.named_modules():
        if not path:
            continue
        try:
            sgm = diffusers_to_sgm(path)
        except KeyError:
            continue  # pure diffusers containers and shared parameter-free helpers have no SGM counterpart
        if next(module.children(), None) is None:
            if _owns_parameters(module):
                leaves.append((sgm, module))
        else:
            classes[sgm] = SGM_CONTAINER_CLASSES.get(type(module).__name__, SGM_DEFAULT_CONTAINER)
    return build_view(leaves, lambda p: classes.get(p, SGM_DEFAULT_CONTAINER), "SdxlUNet2DConditionModel")


# ------------------------------------------------------------------------------------------------------------ FLUX

# BFL container path pattern -> class name in BFL's (and sd-scripts' library/flux_models.py) FLUX model.
BFL_CONTAINER_CLASSES: tuple[tuple[str, str], ...] = (
    (r"double_blocks\.\d+", "DoubleStreamBlock"),
    (r"single_blocks\.\d+", "SingleStreamBlock"),
    (r"double_blocks\.\d+\.(img|txt)_attn", "SelfAttention"),
    (r"double_blocks\.\d+\.(img|txt)_mod", "Modulation"),
    (r"single_blocks\.\d+\.modulation", "Modulation"),
    (r"(double|single)_blocks", "ModuleList"),
    (r"(time|vector|guidance)_in", "MLPEmbedder"),
    (r"final_layer", "LastLayer"),
)


def _bfl_class(path: str) -> str:
    for pattern, name in BFL_CONTAINER_CLASSES:
        if re.fullmatch(pattern, path):
            return name
    return "Sequential"


def bfl_flux_view(transformer: nn.Module) -> ViewNode:
    """The FLUX transformer as BFL's `Flux` model: `double_blocks.N.img_attn.qkv` (a `FusedLinear` over to_q/to_k/
    to_v), `single_blocks.N.linear1`, ... over the diffusers transformer's own Linears.

    Left out: the q/k RMSNorm scales (BFL stores them as `scale`, not `weight`) and the final modulation, whose two
    halves are in the other order in diffusers; no published network module trains those.
    """
    modules = dict(transformer.named_modules())
    names = list(modules)
    num_double = flux_keys.count_blocks(names, flux_keys.DOUBLE_BLOCKS[1])
    num_single = flux_keys.count_blocks(names, flux_keys.SINGLE_BLOCKS[1])
    guidance = any(d in modules for _, d in flux_keys.GUIDANCE_LINEARS)
    rows = [flux_keys.ModuleRow(b, (d,)) for b, d in flux_keys.TOP_LINEARS
            + (flux_keys.GUIDANCE_LINEARS if guidance else ())]
    rows += flux_keys.block_linear_rows(num_double, num_single)
    leaves: list[tuple[str, nn.Module]] = []
    for row in rows:
        layers = [modules.get(d) for d in row.diffusers]
        if any(layer is None for layer in layers):
            continue
        leaves.append((row.bfl, layers[0] if len(layers) == 1 else FusedLinear(layers)))  # type: ignore[arg-type]
    return build_view(leaves, _bfl_class, "Flux")


# ---------------------------------------------------------------------------------------------------- text encoders

_CLIP_TOP_CHILDREN = ("embeddings", "encoder", "final_layer_norm")


def text_encoder_view(text_encoder: nn.Module) -> nn.Module:
    """A CLIP text model with transformers 4's `text_model` wrapper (published names: `lora_te1_text_model_encoder_
    layers_0_...`); models that already have it, and other encoders, are returned as they are."""
    children = dict(text_encoder.named_children())
    if "text_model" in children or not all(c in children for c in _CLIP_TOP_CHILDREN):
        return text_encoder
    inner = view_node("CLIPTextTransformer")
    for name, child in children.items():
        inner.add_module(name, child)
    outer = view_node(type(text_encoder).__name__)
    outer.add_module("text_model", inner)
    return outer


# -------------------------------------------------------------------------------------------------------- registry

_VIEWS: dict[str, Callable[[nn.Module], nn.Module]] = {}


def register_model_view(model_class_name: str, build: Callable[[nn.Module], nn.Module]) -> None:
    """Declare how sd-scripts shows a denoiser of this class (diffusers class name) to network modules."""
    _VIEWS[model_class_name] = build


register_model_view("UNet2DConditionModel", sgm_unet_view)
register_model_view("FluxTransformer2DModel", bfl_flux_view)


_BUILT: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def sd_scripts_view(model: nn.Module | None) -> nn.Module | None:
    """The view of a denoiser registered for its class, or the model itself when none is registered.

    One view per model (built on first use): several networks attached to one model share its fused layers."""
    if model is None:
        return None
    build = _VIEWS.get(type(model).__name__)
    if build is None:
        return model
    view = _BUILT.get(model)
    if view is None:
        view = _BUILT[model] = build(model)
    return view


def sd_scripts_text_encoders(text_encoders: TextEncoders) -> TextEncoders:
    """The text encoder list (or single encoder) with each CLIP model shown as transformers 4 named it."""
    if text_encoders is None:
        return None
    if isinstance(text_encoders, (list, tuple)):
        return [text_encoder_view(te) if te is not None else None for te in text_encoders]
    return text_encoder_view(text_encoders)


__all__ = ["FusedLinear", "ViewNode", "bfl_flux_view", "build_view", "materialized_fused_weights",
           "register_model_view", "release_view", "sd_scripts_text_encoders", "sd_scripts_view", "sgm_unet_view",
           "text_encoder_view", "view_node"]
