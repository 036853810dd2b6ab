"""`--torch_compile` / `--dynamo_backend`: torch.compile of the denoiser, one block at a time.

sd-scripts hands the whole model to accelerate's `dynamo_backend`. Here each block's `forward` is compiled on its
own (regional compilation), for three reasons:
- block swap (`--blocks_to_swap`) moves a block's weights with a forward pre-hook and a `param.data` swap; compiling
  only `forward` keeps the hooks, which run in eager mode around the compiled code, out of the graph, and the weights
  are graph inputs, so a swapped-in slot is read like any other weight;
- gradient checkpointing (diffusers' `_gradient_checkpointing_func(block, ...)`) wraps the call of a block, so it
  re-runs the compiled forward in the backward, as it re-runs the eager one;
- identical blocks share one compiled graph (the weights are inputs, not constants), so compile time grows with the
  number of distinct block shapes, not with the depth of the model.
The network (LoRA, LLLite) is attached before the blocks are compiled: its replaced `Linear.forward`s and hooks are
traced into the block's graph, and an attribute change such as a new network multiplier is a guard that recompiles.

A backend that this torch does not have or that fails on a probe (no C++ compiler for inductor, a backend of an old
torch such as nvfuser) gives one warning, and the model runs eagerly: a config that trains without compile still
trains.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from library.config.environment_flags import warn_once
from library.config.training_flags import DYNAMO_BACKENDS  # noqa: F401 (re-exported: the flag's choices)

# The block classes compiled, by diffusers class name: SDXL's U-Net (resnets, transformer blocks, up/down samplers)
# and FLUX's double and single transformer blocks. A block nested in another compiled block is not compiled twice.
COMPILED_BLOCK_CLASSES: tuple[str, ...] = ("ResnetBlock2D", "BasicTransformerBlock", "Downsample2D", "Upsample2D",
                                           "FluxTransformerBlock", "FluxSingleTransformerBlock")


@dataclass
class CompileResult:
    """What `compile_denoiser_blocks` did: the backend used (None: eager) and how many blocks were compiled."""

    backend: str | None
    blocks: int
    reason: str = ""


def blocks_to_compile(model: nn.Module, class_names: tuple[str, ...] = COMPILED_BLOCK_CLASSES) -> list[nn.Module]:
    """The outermost modules of `model` whose class is one of `class_names`, in module order."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if type(module).__name__ in class_names and id(module) not in inside:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def backend_problem(backend: str, device: torch.device | str = "cpu") -> str | None:
    """Why `backend` cannot compile here (None: it can). The backend is run once on a tiny function on `device`
    (the model's: inductor needs a C++ compiler on the CPU, Triton on a GPU), because torch.compile fails lazily, at
    the first call: a missing compiler would otherwise stop the first training step."""
    import torch._dynamo as dynamo

    known = set(dynamo.list_backends(exclude_tags=()))
    if backend not in known:
        return (f"torch {torch.__version__} has no dynamo backend {backend!r} (it has: "
                f"{', '.join(sorted(known))})")
    try:
        probe = torch.compile(_probe_function, backend=backend, fullgraph=True)
        x = torch.ones(4, device=device, requires_grad=True)
        probe(x).sum().backward()
        if x.grad is None or not torch.allclose(x.grad, torch.full_like(x, 2.0)):
            return f"the {backend} backend computed a wrong gradient on a probe"
    except Exception as e:  # noqa: BLE001 - any failure means: run eagerly
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"the {backend} backend failed on a probe ({type(e).__name__}: {first[:300]})"
    finally:
        dynamo.reset()
    return None


def _probe_function(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 + 1.0


def compile_blocks(blocks: list[nn.Module], backend: str,
                   compile_fn: Callable[..., Any] = torch.compile) -> int:
    """Replace each block's `forward` by its compiled version (the module and its state dict are unchanged)."""
    for block in blocks:
        if getattr(block, "_kohya_compiled", False):
            continue
        block.forward = compile_fn(block.forward, backend=backend)
        block._kohya_compiled = True
    return len(blocks)


def uncompile_blocks(blocks: list[nn.Module]) -> None:
    """Back to the class's eager forward (tests, and a bench that compares both on one model)."""
    for block in blocks:
        if getattr(block, "_kohya_compiled", False):
            del block.forward
            del block._kohya_compiled


def compile_denoiser_blocks(denoiser: nn.Module, backend: str = "inductor") -> CompileResult:
    """`--torch_compile`: compile `denoiser`'s blocks with `backend`, or warn once and leave it eager."""
    device = next((p.device for p in denoiser.parameters() if p.device.type != "meta"), torch.device("cpu"))
    problem = backend_problem(backend, device)
    if problem is not None:
        warn_once([f"--torch_compile: {problem}; the model runs without torch.compile (eager)"])
        return CompileResult(None, 0, problem)
    blocks = blocks_to_compile(denoiser)
    if not blocks:
        reason = f"no compilable blocks in the {type(denoiser).__name__}"
        warn_once([f"--torch_compile: {reason}; the model runs without torch.compile (eager)"])
        return CompileResult(None, 0, reason)
    # one graph per distinct block shape; the default cache of 8 per code object is too small for SDXL's resnets
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    if hasattr(dynamo.config, "accumulated_cache_size_limit"):
        dynamo.config.accumulated_cache_size_limit = max(dynamo.config.accumulated_cache_size_limit, 512)
    return CompileResult(backend, compile_blocks(blocks, backend))


def compile_for_training(denoiser: nn.Module, backend: str, sharded: bool = False) -> CompileResult:
    """The loop's entry: after the network is attached (its layers are traced into the blocks' graphs)."""
    if sharded:
        reason = "the FSDP-sharded model is not compiled (its blocks gather their weights in hooks)"
        warn_once([f"--torch_compile: {reason}; the model runs without torch.compile (eager)"])
        return CompileResult(None, 0, reason)
    result = compile_denoiser_blocks(denoiser, backend)
    if result.backend is not None:
        print(f"--torch_compile: {result.blocks} blocks of the {type(denoiser).__name__} compiled with "
              f"{result.backend} (each distinct block shape compiles at its first step)")
    return result
