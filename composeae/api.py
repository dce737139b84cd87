"""The Python API: a trained model from a checkpoint, embedding images, texts and queries.

    import composeae

    model = composeae.load("runs/composeae-demo/final")
    gallery = model.embed_images(["a.png", "b.png"])                        # (2, D)
    query = model.embed_queries(["ref.png"], ["make the red circle blue"])  # (1, D)
    scores = query @ gallery.T

What belongs here: `load` and `Model`, the one way outside code (a notebook, a batch job, the
search service) turns pictures and texts into the embeddings the evaluation ranks. Images are
prepared as the evaluation prepares its gallery and queries (short side resized, centre crop,
ImageNet normalisation: `composeae.data.decode`) and embedded by `composeae.evaluate.embed`, so
the same picture gives the same row here, in an index and in the recall tables.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image

from composeae.checkpoint import load_checkpoint
from composeae.config import Config
from composeae.data.decode import SampleDecoder
from composeae.errors import UserError
from composeae.evaluate import embed
from composeae.run.build import model_from_checkpoint
from composeae.storage import absolute_url

ImageLike = Union[str, Path, bytes, Image.Image]
"""A picture: a file path, its encoded bytes (PNG, JPEG, ...) or a PIL image."""

BATCH = 64
"""Images embedded per forward pass."""


def load(checkpoint: str, device: str | torch.device = "cpu") -> "Model":
    """The model of `checkpoint` (a run's `final/` or `step-*/` directory or its `model.pt`,
    local or `s3://`), in eval mode on `device`."""
    module, cfg = model_from_checkpoint(load_checkpoint(absolute_url(str(checkpoint))))
    device = torch.device(device)
    return Model(module.to(device), cfg, device)


def _picture(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        source = io.BytesIO(image) if isinstance(image, bytes) else Path(image)
        with Image.open(source) as picture:
            return picture.convert("RGB")
    except (OSError, ValueError) as exc:
        what = "image bytes" if isinstance(image, bytes) else f"image {image}"
        raise UserError(f"{what} cannot be read ({type(exc).__name__})") from None


@dataclass
class Model:
    """A trained retrieval model and its config. Image and query embeddings are float32 numpy
    arrays with unit-length rows: the cosine the recall ranks by is their dot product."""
    module: torch.nn.Module
    config: Config
    device: torch.device

    def pixels(self, images: Iterable[ImageLike]) -> torch.Tensor:
        """Pictures as the evaluation sees them: uint8 (B, S, S, 3), S = `data.image_size`."""
        decoder = SampleDecoder("gallery", self.config.data.image_size)
        shown = [decoder.pixels(_picture(image)) for image in images]
        size = self.config.data.image_size
        return torch.stack(shown) if shown else torch.zeros((0, size, size, 3), dtype=torch.uint8)

    def embed_pixels(self, pixels: torch.Tensor, texts: Sequence[str] | None = None, *,
                     batch: int = BATCH) -> np.ndarray:
        """(B, D) embeddings of `pixels` (uint8 (B, S, S, 3), from `pixels`): gallery images,
        or with `texts` (one per image) composed queries; `batch` rows per forward pass."""
        if texts is not None and len(texts) != len(pixels):
            raise UserError(f"{len(pixels)} images but {len(texts)} texts: give one text per "
                            f"reference image")
        batches = []
        for start in range(0, len(pixels), batch):
            part = {"image": pixels[start:start + batch]}  # `embed` normalises on the device
            if texts is not None:
                part["text"] = list(texts[start:start + batch])
            batches.append(part)
        out = embed(self.module, batches, "image", "text" if texts is not None else None, (),
                    self.device, self.config.train.precision)
        if not len(pixels):  # nothing embedded: (0, D)
            return np.zeros((0, self.config.model.embed_dim), np.float32)
        norms = np.linalg.norm(out["emb"], axis=1, keepdims=True)
        return (out["emb"] / np.maximum(norms, 1e-12)).astype(np.float32)

    def embed_images(self, images: Iterable[ImageLike]) -> np.ndarray:
        """(N, D) gallery embeddings of N pictures (the targets' side of retrieval)."""
        return self.embed_pixels(self.pixels(images))

    def embed_queries(self, images: Iterable[ImageLike], texts: Sequence[str]) -> np.ndarray:
        """(N, D) embeddings of N composed queries: reference picture i modified by text i."""
        return self.embed_pixels(self.pixels(images), list(texts))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, T) text-encoder features of N modifier texts, as they are (not normalised): what
        the composer reads, not a point of the retrieval space (T = `model.text_dim`)."""
        features = self.module.encode_text(list(texts))
        if features is None:
            raise UserError(f"model {self.config.model.name} reads no text: it has no text "
                            f"encoder")
        return features.float().cpu().numpy()

