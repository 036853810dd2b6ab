"""Host-to-GPU copies on the training step that never make the host wait for the GPU.

A plain `t.to("cuda")` of a host tensor ends with a stream synchronisation: the host waits until every kernel queued
before the copy has run, so it cannot queue the next step while the GPU works, and the GPU then idles while the host
catches up (`torch.cuda.set_sync_debug_mode` reports each one). With `non_blocking=True` the copy is ordered on the
stream and the host goes on. From pinned memory the GPU reads the source by DMA; from pageable memory CUDA copies it
into a staging buffer before the call returns (so the source may be freed at once), still without synchronising the
device. The dtype is changed on the GPU after the copy: asked of the copy itself, torch would convert on the host
into a new pageable temporary first.

Used for what the step makes on the host: noise and timesteps (drawn from per-sample CPU generators, so that a
sample's draw does not depend on the device or on how the batch is split), SDXL's size conditions, token ids, masks
and per-sample weights. Cached latents and text outputs arrive pinned from the prefetcher.
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None,
              pin: bool = False) -> torch.Tensor:
    """`t.to(device, dtype)` without a host wait when it is a host-to-GPU copy. `pin` copies a large pageable
    source into pinned memory first (a host memcpy) so that the transfer itself runs by DMA."""
    target = torch.device(device)
    if t.device.type != "cpu" or target.type != "cuda":
        return t.to(device=target, dtype=dtype)
    if pin and not t.is_pinned():
        t = t.pin_memory()
    out = t.to(device=target, non_blocking=True)
    return out if dtype is None or out.dtype == dtype else out.to(dtype)
