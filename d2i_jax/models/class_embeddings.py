"""Class-name text embeddings for VPD's cross-attention context: one CLIP text vector per class.

VPD's recipe (its only embedding script, `depth/dump_nyu_text_embeddings.py`; the ADE20K file was evidently made the
same way): each class name, `_` read as a space, goes into the 80 ImageNet prompt templates of CLIP's zero-shot
classifier; each prompt is tokenised to 20 tokens and encoded by CLIP ViT-L/14's text tower (SD1.5's text encoder);
the EOS token's final-LayerNorm state (`pooler_output`) is averaged over the templates, without normalisation.
`load_class_embeddings` reads a stored `[N, D]` file instead (`.npy`, or VPD's `class_embeddings.pth`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from d2i_jax.models.clip import CLIPTextModel, embed_pooled

# The 80 prompt templates of CLIP's ImageNet zero-shot classifier, in the order VPD averages them.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)
MAX_LENGTH = 20  # VPD's FrozenCLIPEmbedder(max_length=20) in the embedding script


def class_embeddings(text_encoder: CLIPTextModel, params: Any, tokenizer: Any, class_names: Sequence[str], *,
                     templates: Sequence[str] = IMAGENET_TEMPLATES, max_length: int = MAX_LENGTH) -> np.ndarray:
    """`[len(class_names), hidden]` float32: per class, the mean over `templates` of the prompts' pooled CLIP
    output (VPD's recipe, see the module docstring)."""
    rows = []
    for name in class_names:  # one encoder call per class, all of the same shape: compiled once
        prompts = [t.format(name.replace("_", " ")) for t in templates]
        pooled = embed_pooled(text_encoder, params, tokenizer, prompts, max_length)
        rows.append(np.asarray(pooled, np.float32).mean(axis=0))
    return np.stack(rows)


def load_class_embeddings(path: str | Path) -> np.ndarray:
    """A stored `[N, D]` embedding table as float32: a `.npy`, or a PyTorch file holding one tensor (VPD's
    `segmentation/class_embeddings.pth`, read with `torch.load(weights_only=True)`)."""
    path = Path(path)
    if path.suffix == ".npy":
        table = np.load(path)
    else:
        import torch  # only for VPD's .pth files

        table = torch.load(path, map_location="cpu", weights_only=True).float().numpy()
    if table.ndim != 2:
        raise ValueError(f"{path}: class embeddings must be [num_classes, dim], got shape {table.shape}")
    return table.astype(np.float32)
