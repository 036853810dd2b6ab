"""DINO / CLIP-I / CLIP-T: definitions (all pairs vs own prompt), model loading from local folders, token stripping."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from library.errors import ModelLoadError
from library.eval.metrics import (
    ClipEmbedder,
    DinoEmbedder,
    EmbeddingModel,
    TextEmbeddingModel,
    _features,
    clip_i_score,
    clip_t_score,
    dino_score,
    load_clip_model,
    load_dino_model,
    per_image_cosine,
    strip_token,
)
from library.eval.tiny_models import save_tiny_clip, save_tiny_dino


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eval_models")
    return {
        "dino": str(save_tiny_dino(root / "dino", seed=0)),
        "dinov2": str(save_tiny_dino(root / "dinov2", seed=1, kind="dinov2")),
        "clip": str(save_tiny_clip(root / "clip", seed=0)),
    }


@pytest.fixture(scope="session")
def dino(eval_models) -> DinoEmbedder:
    return load_dino_model(eval_models["dino"])


@pytest.fixture(scope="session")
def clip(eval_models) -> ClipEmbedder:
    return load_clip_model(eval_models["clip"])


def shape_image(kind: int, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """Distinct flat-colour drawings: the 'real subject' photos of these tests."""
    backgrounds = [(255, 255, 255), (40, 40, 40), (200, 220, 120)]
    fills = [(220, 30, 30), (30, 60, 230), (250, 250, 0)]
    img = Image.new("RGB", size, backgrounds[kind % 3])
    draw = ImageDraw.Draw(img)
    w, h = size
    if kind % 3 == 0:
        draw.ellipse((8, 6, w - 8, h - 6), fill=fills[0])
    elif kind % 3 == 1:
        draw.rectangle((4, 4, w // 2, h - 4), fill=fills[1])
    else:
        draw.polygon([(w // 2, 2), (w - 2, h - 2), (2, h - 2)], fill=fills[2])
    return np.asarray(img)


def noise_image(seed: int, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------- definitions


def test_scores_are_mean_over_all_pairs():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    real = torch.cat([e1, e2])
    # one generated image equal to the first real one: cos 1 with it, 0 with the other -> 0.5 over all pairs
    assert dino_score(e1 * 2, real) == pytest.approx(0.5)
    assert clip_i_score(torch.cat([e1, e2]), real) == pytest.approx(0.5)  # not 1.0: the off-diagonal pairs count
    assert per_image_cosine(torch.cat([e1, e2]), real) == pytest.approx([0.5, 0.5])


def test_clip_t_pairs_each_image_with_its_own_prompt():
    imgs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    expected = (1.0 + 1 / np.sqrt(2)) / 2  # own prompts only; all pairs would give (1 + 0 + 0.707 + 0.707) / 4
    assert clip_t_score(imgs, texts) == pytest.approx(expected)
    with pytest.raises(ValueError, match="one prompt embedding per image"):
        clip_t_score(imgs, texts[:1])


def test_embedding_size_mismatch_is_refused():
    with pytest.raises(ValueError, match="embedding sizes differ"):
        dino_score(torch.ones(2, 4), torch.ones(2, 8))


@pytest.mark.parametrize("prompt, expected", [
    ("a photo of sksToy toy on a beach", "a photo of toy on a beach"),
    ("sksToy, a toy in the snow", "a toy in the snow"),
    ("a toy, sksToy, in a box", "a toy, in a box"),
    ("a SKSTOY toy", "a toy"),
    ("a sksToys toy", "a sksToys toy"),  # only the whole word
    ("a toy", "a toy"),
])
def test_strip_token(prompt, expected):
    assert strip_token(prompt, "sksToy") == expected


def test_strip_token_without_token_keeps_prompt():
    assert strip_token(" a toy ", None) == "a toy"
    assert strip_token("a toy", "") == "a toy"


def test_features_accepts_tensor_and_output_object():
    t = torch.ones(2, 3)

    class Out:
        pooler_output = t * 2

    assert torch.equal(_features(t, ("pooler_output",)), t)
    assert torch.equal(_features(Out(), ("image_embeds", "pooler_output")), t * 2)
    assert torch.equal(_features((t * 3,), ("pooler_output",)), t * 3)


# ------------------------------------------------------------------------------------------- real models


def test_embedders_satisfy_protocols(dino, clip):
    assert isinstance(dino, EmbeddingModel) and not isinstance(dino, TextEmbeddingModel)
    assert isinstance(clip, TextEmbeddingModel)


@pytest.mark.parametrize("which", ["dino", "dinov2", "clip"])
def test_copies_of_one_image_score_one(eval_models, which):
    model = load_clip_model(eval_models[which]) if which == "clip" else load_dino_model(eval_models[which])
    real = model.embed_images([shape_image(0)])
    gen = model.embed_images([shape_image(0)] * 5)  # batch positions must not change the embedding
    assert dino_score(gen, real) == pytest.approx(1.0, abs=1e-5)
    assert clip_i_score(gen, model.embed_images([shape_image(0)] * 3)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("which", ["dino", "clip"])
def test_unrelated_and_mixed_sets_score_less(dino, clip, which):
    model = dino if which == "dino" else clip
    real = model.embed_images([shape_image(0)])
    noise = model.embed_images([noise_image(s) for s in range(3)])
    assert dino_score(noise, real) < 1.0 - 1e-4
    several = model.embed_images([shape_image(k) for k in range(3)])
    # the generated set equal to the real set: still below 1.0, since each image also meets the other two
    assert clip_i_score(several, several) < 1.0 - 1e-4


def test_dino_embedding_is_cls_token(eval_models, dino):
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(eval_models["dino"]).eval()
    processor = AutoImageProcessor.from_pretrained(eval_models["dino"])
    img = Image.fromarray(shape_image(1))
    with torch.no_grad():
        cls = model(**processor(images=[img], return_tensors="pt")).last_hidden_state[:, 0]
    torch.testing.assert_close(dino.embed_images([shape_image(1)]), cls, rtol=1e-5, atol=1e-5)


def test_batching_does_not_change_embeddings(eval_models):
    images = [shape_image(k) for k in range(3)] + [noise_image(0)]
    one = load_dino_model(eval_models["dino"], batch_size=1).embed_images(images)
    many = load_dino_model(eval_models["dino"], batch_size=3).embed_images(images)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)


def test_clip_text_embeddings_match_transformers(eval_models, clip):
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(eval_models["clip"]).eval()
    tok = CLIPTokenizer.from_pretrained(eval_models["clip"])
    prompts = ["a photo of a toy", "a toy on a beach at sunset"]
    with torch.no_grad():
        out = model.get_text_features(**tok(prompts, padding=True, return_tensors="pt"))
    expected = out if isinstance(out, torch.Tensor) else out.pooler_output
    torch.testing.assert_close(clip.embed_texts(prompts), expected, rtol=1e-5, atol=1e-5)


def test_long_prompts_are_truncated_not_refused(clip):
    emb = clip.embed_texts(["word " * 200])
    assert emb.shape == (1, 16) and torch.isfinite(emb).all()


# ------------------------------------------------------------------------------------------- loading errors


def test_missing_model_folder_names_flag_and_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError) as err:
        load_dino_model(missing)
    assert "--eval_dino_model" in str(err.value) and str(missing) in str(err.value)
    with pytest.raises(ModelLoadError, match="--eval_clip_model"):
        load_clip_model(missing)


def test_hub_id_is_refused_without_download():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_clip_model("openai/clip-vit-large-patch14")


def test_folder_without_processor_is_a_clear_error(tmp_path, eval_models):
    import shutil

    folder = tmp_path / "dino_no_processor"
    shutil.copytree(eval_models["dino"], folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match="--eval_dino_model: cannot load"):
        load_dino_model(folder)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_dino_model(tmp_path)
