"""Sample images during training: prompts from the prompt language, fixed seeds, PNG metadata, TensorBoard."""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from library.families.interface import SampleRequest

DEFAULT_SAMPLE_STEPS = 30
DEFAULT_SAMPLE_SCALE = 7.0


def requests_from_prompt_file(path: str, default_size: tuple[int, int], seed: int) -> list[SampleRequest]:
    """One request per prompt line; a line without --d gets seed+index so that samples are comparable over steps."""
    from library.prompts.language import read_prompt_file

    requests = []
    for i, spec in enumerate(read_prompt_file(path)):
        image_seed = spec.seed if spec.seed is not None else seed + i
        rendered = spec.render(random.Random(image_seed))
        extras = {"control_image": spec.control_image} if getattr(spec, "control_image", None) else None
        requests.append(SampleRequest(
            prompt=rendered.prompt, negative_prompt=rendered.negative_prompt or "",
            width=spec.width or default_size[0], height=spec.height or default_size[1],
            steps=spec.steps or DEFAULT_SAMPLE_STEPS, scale=spec.scale if spec.scale is not None else DEFAULT_SAMPLE_SCALE,
            seed=image_seed, extras=extras))
    return requests


def check_sampler(name: str) -> None:
    """Raise the sampler module's own error for an unknown --sample_sampler (found before training, not at the
    first sample step)."""
    from library.prompts.samplers import canonical_sampler_name

    canonical_sampler_name(name)


def check_prompt_file(path: str, seed: int) -> list[str]:
    """Everything wrong with a --sample_prompts file that sampling would hit later, as messages naming the file and
    line: its syntax and option values (parsed and rendered as `requests_from_prompt_file` does) and the control
    images (`--cn`) it names."""
    from library.data.images import ImageLoadError, image_size
    from library.errors import UserError
    from library.prompts.language import read_prompt_file

    try:
        requests_from_prompt_file(path, (64, 64), seed)
        specs = read_prompt_file(path)
    except UserError as e:
        return [str(e)]
    problems = []
    for spec in specs:
        control = getattr(spec, "control_image", None)
        if not control:
            continue
        where = f"{path} line {spec.line_no}"
        if not os.path.isfile(control):
            problems.append(f"{where}: the control image '--cn {control}' does not exist")
            continue
        try:
            image_size(control)
        except ImageLoadError as e:
            problems.append(f"{where}: --cn {e}")
    return problems


def sample_during_training(session: Any, step: int, out_dir: str | None = None, multiplier: float | None = None,
                           log_images: bool = True, write: bool = True) -> list[str]:
    """Generate the sample prompts with the network as it is now (or at `multiplier`, e.g. 0 for the base model);
    restore training mode, the multiplier and the RNG afterwards."""
    from library.prompts.png_metadata import GenerationInfo, save_png_with_info

    cfg = session.cfg
    res = session.datasets[0].config.resolution
    requests = requests_from_prompt_file(cfg.sample.sample_prompts, res, cfg.training.seed)
    out_dir = out_dir or os.path.join(cfg.save.output_dir, "sample")
    os.makedirs(out_dir, exist_ok=True)
    net = session.accelerator.unwrap_model(session.network.module)
    if multiplier is not None:
        net.set_multiplier(multiplier)
    denoiser = session.models[session.family.denoiser_key]
    was_training = denoiser.training, net.training
    denoiser.eval()
    net.eval()
    # the VAE and text encoders may have been moved off the device after caching: bring them back while sampling
    parked = [m for m in [session.models["vae"], *(session.models.get("text_encoders") or [])]
              if next(m.parameters()).device != session.accelerator.device]
    for m in parked:
        m.to(session.accelerator.device)
    rng_state = torch.get_rng_state()
    try:
        with torch.no_grad(), session.accelerator.autocast():
            images = session.family.sample_images(session.models, requests, cfg.sample.sample_sampler,
                                                  before_generate=session.network.before_sample)
    finally:
        session.network.after_sample()
        if multiplier is not None:
            net.set_multiplier(1.0)
        torch.set_rng_state(rng_state)
        for m in parked:
            m.to("cpu")
        denoiser.train(was_training[0])
        net.train(was_training[1])
    paths: list[str] = []
    if not write:
        return paths
    for i, (req, img) in enumerate(zip(requests, images)):
        path = os.path.join(out_dir, f"{cfg.save.output_name}_{step:06d}_{i:02d}_{req.seed}.png")
        save_png_with_info(img, path, GenerationInfo(prompt=req.prompt, negative_prompt=req.negative_prompt,
                                                     seed=req.seed, steps=req.steps, scale=req.scale,
                                                     sampler=cfg.sample.sample_sampler, width=req.width,
                                                     height=req.height))
        paths.append(path)
    if log_images:
        _log_images(session, images, step)
    return paths


def _log_images(session: Any, images: list[Any], step: int) -> None:
    try:
        tracker = session.accelerator.get_tracker("tensorboard", unwrap=True)
    except Exception:  # no tensorboard tracker configured
        return
    if tracker is None or not hasattr(tracker, "add_image"):
        return
    for i, img in enumerate(images):
        tracker.add_image(f"sample/{i}", np.asarray(img.convert("RGB")), step, dataformats="HWC")
