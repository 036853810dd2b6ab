"""Subject-fidelity metrics of the DreamBooth paper: DINO, CLIP-I and CLIP-T.

DINO and CLIP-I ask "does the generated subject look like the real one?": the mean cosine similarity between the
embeddings of every (generated, real) pair. DINO is the stricter of the two, because its self-supervised training
keeps apart objects of the same class that CLIP would call alike. CLIP-T asks "does the image still follow the
prompt?": the mean cosine between each generated image and its own prompt, with the rare token (e.g. ``sksToy``)
removed, since CLIP never learnt what it means.

Models come from local transformers folders only (a model hub lookup on a cluster node is a silent hang or a
licence surprise), each with its image processor saved beside it so that resizing and normalisation match training.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image

from library.errors import ModelLoadError

DINO_FLAG = "--eval_dino_model"
CLIP_FLAG = "--eval_clip_model"
DEFAULT_BATCH_SIZE = 16


@runtime_checkable
class EmbeddingModel(Protocol):
    """Anything that maps RGB images (uint8 HxWx3) to one embedding row each; DINO and CLIP both are."""

    name: str

    def embed_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, D) float embeddings, one row per image, in input order."""
        ...


@runtime_checkable
class TextEmbeddingModel(EmbeddingModel, Protocol):
    """An embedding model that also embeds text into the same space as its images (CLIP)."""

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) float embeddings, one row per text, in input order."""
        ...


# --------------------------------------------------------------------------------------------------- scores


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) cosine similarities. Computed in float64 so that identical images give 1.0 to well
    below the 1e-5 a user (or a test) would check, whatever dtype the model ran in."""
    a = _as_2d(a, "first")
    b = _as_2d(b, "second")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]} (embeddings of different models?)")
    a = torch.nn.functional.normalize(a.double(), dim=1)
    b = torch.nn.functional.normalize(b.double(), dim=1)
    return a @ b.T


def _as_2d(x: torch.Tensor, which: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().cpu()
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"the {which} embedding set must be a non-empty (N, D) tensor, got shape {tuple(x.shape)}")
    return x


def mean_pairwise_cosine(gen_embs: torch.Tensor, real_embs: torch.Tensor) -> float:
    """Mean cosine over ALL (generated, real) pairs, the DreamBooth paper's definition. Copies of one real image
    score 1.0; copies of several different real images do not, because each copy is also compared with the others."""
    return float(cosine_matrix(gen_embs, real_embs).mean())


def per_image_cosine(gen_embs: torch.Tensor, real_embs: torch.Tensor) -> list[float]:
    """For each generated image, its mean cosine to all real images (the row means; their mean is the score)."""
    return [float(v) for v in cosine_matrix(gen_embs, real_embs).mean(dim=1)]


def dino_score(gen_embs: torch.Tensor, real_embs: torch.Tensor) -> float:
    """DINO: mean pairwise cosine of DINO CLS embeddings (generated x real)."""
    return mean_pairwise_cosine(gen_embs, real_embs)


def clip_i_score(gen_embs: torch.Tensor, real_embs: torch.Tensor) -> float:
    """CLIP-I: mean pairwise cosine of CLIP image embeddings (generated x real)."""
    return mean_pairwise_cosine(gen_embs, real_embs)


def paired_cosine(img_embs: torch.Tensor, text_embs: torch.Tensor) -> list[float]:
    """Cosine between row i of the images and row i of the texts, for every i."""
    a = _as_2d(img_embs, "image")
    b = _as_2d(text_embs, "text")
    if a.shape != b.shape:
        raise ValueError(f"need one prompt embedding per image: image embeddings {tuple(a.shape)}, "
                         f"text embeddings {tuple(b.shape)}")
    a = torch.nn.functional.normalize(a.double(), dim=1)
    b = torch.nn.functional.normalize(b.double(), dim=1)
    return [float(v) for v in (a * b).sum(dim=1)]


def clip_t_score(gen_img_embs: torch.Tensor, text_embs: torch.Tensor) -> float:
    """CLIP-T: mean cosine between each generated image and its own prompt (not all pairs: a prompt says nothing
    about the images made from other prompts)."""
    values = paired_cosine(gen_img_embs, text_embs)
    return float(np.mean(values))


def strip_token(prompt: str, token: str | None) -> str:
    """`prompt` without the rare token, as a whole word and in any letter case (CLIP's tokenizer lower-cases), with
    the spaces and commas it leaves behind tidied: "sksToy, a toy on a beach" -> "a toy on a beach"."""
    if not token or not token.strip():
        return prompt.strip()
    pattern = r"(?<![\w])" + re.escape(token.strip()) + r"(?![\w])"
    text = re.sub(pattern, " ", prompt, flags=re.IGNORECASE)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:])", r"\1", text)  # "a , toy" -> "a, toy"
    text = re.sub(r"([,;:])(\s*[,;:])+", r"\1", text)  # ", ," -> ","
    text = text.strip()
    text = re.sub(r"^[,;:]\s*", "", text)
    text = re.sub(r"\s*[,;:]$", "", text)
    return text.strip()


# --------------------------------------------------------------------------------------------------- models


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' load reports, progress bars and 'torchvision missing' notes while loading: the user asked
    for metrics, not for the library's chatter. Restores the previous settings."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def check_model_folder(path: str | os.PathLike, flag: str) -> Path:
    """The folder as a Path, or a ModelLoadError that names the flag and the path. Hub ids are refused on purpose:
    these metrics never download."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelLoadError(f"{flag}: model folder '{path}' does not exist (give a local transformers folder; "
                             "models are never downloaded)")
    if not folder.is_dir():
        raise ModelLoadError(f"{flag}: '{path}' is a file; give the transformers model folder that holds "
                             "config.json and preprocessor_config.json")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{flag}: '{path}' has no config.json; is it a transformers model folder?")
    return folder


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _to_pil(images: Sequence[np.ndarray]) -> list[Image.Image]:
    """PIL images, so the processors never have to guess which axis holds the channels (a 3-px-wide image fools
    their numpy heuristics)."""
    out = []
    for img in images:
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"expected uint8 HxWx3 RGB pixels, got {arr.dtype} {arr.shape}")
        out.append(Image.fromarray(arr, "RGB"))
    return out


def _features(output: Any, names: Sequence[str]) -> torch.Tensor:
    """The embedding tensor from get_image_features/get_text_features: a tensor in transformers 4, an output object
    whose pooler_output holds the projected embedding in transformers 5."""
    if isinstance(output, torch.Tensor):
        return output
    for name in names:
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find embeddings in a {type(output).__name__} (looked for {', '.join(names)})")


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, max(1, batch_size)):
        yield slice(start, min(n, start + batch_size))


def _embed_image_batches(images: Sequence[np.ndarray], batch_size: int, image_processor: Any, model: Any,
                         embed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Preprocess in batches, move the pixels to the model's device and dtype, and stack the float32 embeddings
    (one row per image) on the CPU."""
    rows = []
    pil = _to_pil(images)
    for part in _batches(len(pil), batch_size):
        pixels = image_processor(images=pil[part], return_tensors="pt")["pixel_values"]
        rows.append(embed(pixels.to(model.device, dtype=model.dtype)).float().cpu())
    return torch.cat(rows) if rows else torch.empty(0, 0)


def _load_local(path: str | os.PathLike, flag: str, what: str, processor_cls: Any,
                model_cls: Any) -> tuple[Any, Any]:
    """A processor and a model from a local folder only; a failure is one message naming the flag and the path."""
    folder = check_model_folder(path, flag)
    try:
        with quiet_transformers():
            return (processor_cls.from_pretrained(str(folder), local_files_only=True),
                    model_cls.from_pretrained(str(folder), local_files_only=True))
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{flag}: cannot load {what} from '{path}' ({type(e).__name__}: {_first_line(e)})") from None


class DinoEmbedder:
    """A DINO / DINOv2 ViT from a local folder; an image's embedding is the CLS token of the last hidden state, as
    the DreamBooth paper used (ViT-S/16 DINO)."""

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device | None = "cpu",
                 batch_size: int = DEFAULT_BATCH_SIZE, flag: str = DINO_FLAG):
        from transformers import AutoImageProcessor, AutoModel

        self.name = str(path)
        self.batch_size = batch_size
        self.device = _pick_device(device)
        self.processor, self.model = _load_local(path, flag, "a DINO model and its image processor",
                                                 AutoImageProcessor, AutoModel)
        self.model.to(self.device).eval()

    @torch.no_grad()
    def embed_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return _embed_image_batches(images, self.batch_size, self.processor, self.model,
                                    lambda pixels: self.model(pixel_values=pixels).last_hidden_state[:, 0])


class ClipEmbedder:
    """A CLIP model and its processor (tokenizer + image processor) from a local folder; images and texts land in
    the shared projected space, which CLIP-I and CLIP-T compare in."""

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device | None = "cpu",
                 batch_size: int = DEFAULT_BATCH_SIZE, flag: str = CLIP_FLAG):
        from transformers import AutoProcessor, CLIPModel

        self.name = str(path)
        self.batch_size = batch_size
        self.device = _pick_device(device)
        self.processor, self.model = _load_local(path, flag, "a CLIP model and its processor", AutoProcessor,
                                                 CLIPModel)
        if not hasattr(self.processor, "tokenizer") or not hasattr(self.processor, "image_processor"):
            raise ModelLoadError(f"{flag}: '{path}' must hold a CLIP processor (tokenizer and image processor), "
                                 f"found {type(self.processor).__name__}")
        self.max_length = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        self.model.to(self.device).eval()

    @torch.no_grad()
    def embed_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return _embed_image_batches(
            images, self.batch_size, self.processor.image_processor, self.model,
            lambda pixels: _features(self.model.get_image_features(pixel_values=pixels),
                                     ("image_embeds", "pooler_output")))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        rows = []
        texts = list(texts)
        for part in _batches(len(texts), self.batch_size):
            # long prompts are cut at CLIP's context (77 tokens), as the text encoders of SDXL do
            tokens = self.processor.tokenizer(texts[part], padding=True, truncation=True,
                                              max_length=self.max_length, return_tensors="pt")
            out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                               attention_mask=tokens["attention_mask"].to(self.device))
            rows.append(_features(out, ("text_embeds", "pooler_output")).float().cpu())
        return torch.cat(rows) if rows else torch.empty(0, 0)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_dino_model(path: str | os.PathLike, *, device: str | torch.device | None = "cpu",
                    batch_size: int = DEFAULT_BATCH_SIZE) -> DinoEmbedder:
    """The DINO embedder of `--eval_dino_model`."""
    return DinoEmbedder(path, device=device, batch_size=batch_size)


def load_clip_model(path: str | os.PathLike, *, device: str | torch.device | None = "cpu",
                    batch_size: int = DEFAULT_BATCH_SIZE) -> ClipEmbedder:
    """The CLIP embedder of `--eval_clip_model`."""
    return ClipEmbedder(path, device=device, batch_size=batch_size)


__all__ = [
    "CLIP_FLAG",
    "ClipEmbedder",
    "DINO_FLAG",
    "DinoEmbedder",
    "EmbeddingModel",
    "TextEmbeddingModel",
    "check_model_folder",
    "clip_i_score",
    "clip_t_score",
    "cosine_matrix",
    "dino_score",
    "load_clip_model",
    "load_dino_model",
    "mean_pairwise_cosine",
    "paired_cosine",
    "per_image_cosine",
    "strip_token",
]
