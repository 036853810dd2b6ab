"""Sample images during training: prompts from the prompt language, fixed seeds, PNG metadata, TensorBoard."""
from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from library.families.interface import SampleRequest

if TYPE_CHECKING:
    from library.train.session import Session

DEFAULT_SAMPLE_STEPS = 30
DEFAULT_SAMPLE_SCALE = 7.0


def requests_from_prompt_file(path: str, default_size: tuple[int, int], seed: int) -> list[SampleRequest]:
    """One request per prompt (a .txt line, or a .toml / .json entry as sd-scripts writes them); a prompt without
    a seed gets seed+index so that samples are comparable over steps. A prompt's own sampler (--ss), distilled
    guidance (--g) and control image (--cn) travel in the request's fields of those names."""
    from library.prompts.prompt_files import read_training_prompts

    requests = []
    for i, entry in enumerate(read_training_prompts(path)):
        spec = entry.spec
        image_seed = spec.seed if spec.seed is not None else seed + i
        rendered = spec.render(random.Random(image_seed))
        requests.append(SampleRequest(
            prompt=rendered.prompt, negative_prompt=rendered.negative_prompt or "",
            width=spec.width or default_size[0], height=spec.height or default_size[1],
            steps=spec.steps or DEFAULT_SAMPLE_STEPS, scale=spec.scale if spec.scale is not None else DEFAULT_SAMPLE_SCALE,
            seed=image_seed, control_image=spec.control_image or None, sampler=entry.sampler or None,
            guidance_scale=entry.guidance_scale))
    return requests


def check_sampler(name: str) -> None:
    """Raise the sampler module's own error for an unknown --sample_sampler (found before training, not at the
    first sample step)."""
    from library.prompts.samplers import canonical_sampler_name

    canonical_sampler_name(name)


def check_prompt_file(path: str, seed: int) -> list[str]:
    """Everything wrong with a --sample_prompts file that sampling would hit later, as messages naming the file and
    line (or entry): its syntax and option values (parsed and rendered as `requests_from_prompt_file` does), each
    prompt's own sampler (--ss) and the control images (--cn) it names."""
    from library.data.images import ImageLoadError, image_size
    from library.errors import UserError
    from library.prompts.prompt_files import read_training_prompts

    try:
        requests_from_prompt_file(path, (64, 64), seed)
        entries = read_training_prompts(path)
    except UserError as e:
        return [str(e)]
    problems = []
    for entry in entries:
        if entry.sampler:
            try:
                check_sampler(entry.sampler)
            except UserError as e:
                problems.append(f"{entry.where}: --ss {e}")
        control = entry.spec.control_image
        if not control:
            continue
        if not os.path.isfile(control):
            problems.append(f"{entry.where}: the control image '--cn {control}' does not exist")
            continue
        try:
            image_size(control)
        except ImageLoadError as e:
            problems.append(f"{entry.where}: --cn {e}")
    return problems


def sample_during_training(session: Session, step: int, out_dir: str | None = None, multiplier: float | None = None,
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
    denoiser = session.models.denoiser
    was_training = denoiser.training, net.training
    denoiser.eval()
    net.eval()
    # the VAE and text encoders may have been moved off the device after caching: bring them back while sampling
    parked = [m for m in [session.models.vae, *session.models.text_encoders]
              if next(m.parameters()).device != session.accelerator.device]
    for m in parked:
        m.to(session.accelerator.device)
    rng_state = torch.get_rng_state()
    try:
        images = [None] * len(requests)
        # a prompt's own sampler (--ss) wins over --sample_sampler: one call per sampler, order kept
        by_sampler: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_sampler.setdefault(_sampler_of(req, cfg.sample.sample_sampler), []).append(i)
        with torch.no_grad(), session.accelerator.autocast():
            for sampler, indices in by_sampler.items():
                made = session.family.sample_images(session.models, [requests[i] for i in indices], sampler,
                                                    before_generate=session.network.before_sample)
                for i, img in zip(indices, made):
                    images[i] = img
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
                                                     sampler=_sampler_of(req, cfg.sample.sample_sampler),
                                                     width=req.width,
                                                     height=req.height))
        paths.append(path)
    if log_images:
        _log_images(session, images, step)
    return paths


def _sampler_of(request: SampleRequest, default: str) -> str:
    return request.sampler or default


def _log_images(session: Session, images: list[Any], step: int) -> None:
    try:
        tracker = session.accelerator.get_tracker("tensorboard", unwrap=True)
    except Exception:  # no tensorboard tracker configured
        return
    if tracker is None or not hasattr(tracker, "add_image"):
        return
    for i, img in enumerate(images):
        tracker.add_image(f"sample/{i}", np.asarray(img.convert("RGB")), step, dataformats="HWC")
