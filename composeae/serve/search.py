"""Search: a composed query (reference image + modifier text) against a gallery index.

What belongs here: loading the model an index was built with, embedding one query the way the
evaluation embeds its queries (`SampleDecoder.pixels`, `normalise`, `evaluate.embed`), the
exact top-k by inner product, and the HTML page of one result. Nothing here knows about HTTP.

`top_k` is exact and memory-bounded: the gallery is scored block by block (`BLOCK_ROWS` rows),
each block's top-k is merged into the running top-k, so the extra memory is one block of scores
and a (Q, k) pair of tensors whatever the gallery size. Float16 rows are upcast block by block
into one reused buffer (CPU half-precision matmuls are slow); `load_index` holds rows as
float32 by default, which needs no upcast. Ties are broken towards the lower row.
"""

from __future__ import annotations

import base64
import html
import io
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from composeae.api import Model
from composeae.errors import UserError
from composeae.serve.index import GalleryIndex, checkpoint_file

BLOCK_ROWS = {torch.float32: 65536, torch.float16: 8192}
"""Gallery rows scored at once. Float32: (Q, 65536) scores per block, few merges. Float16:
8192 x 512 rows upcast into a 16 MB buffer, mostly cache-resident until the matmul reads it."""
MAX_K = 1000
MAX_TEXT = 500
"""Characters of modifier text accepted."""
MAX_PIXELS = 4096 * 4096
"""Largest reference image accepted (width x height), checked before it is decoded."""


def top_k(queries: torch.Tensor, gallery: torch.Tensor, k: int, *,
          exclude: list[int | None] | None = None,
          block_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (Q, k) float32, rows (Q, k) int64) of the `k` largest inner products of each query
    (Q, D) with the gallery (N, D), best first. `exclude[q]`: a gallery row query q may not
    return (its own reference image)."""
    queries = queries.float()
    block_rows = block_rows or BLOCK_ROWS.get(gallery.dtype, 8192)
    num, k = gallery.shape[0], min(k, gallery.shape[0])
    best_scores = torch.full((queries.shape[0], 0), float("-inf"))
    best_rows = torch.zeros((queries.shape[0], 0), dtype=torch.long)
    block = (_block_buffer(min(block_rows, num), gallery.shape[1])
             if gallery.dtype != torch.float32 else None)
    for begin in range(0, num, block_rows):
        part = gallery[begin:begin + block_rows]
        if part.dtype != torch.float32:
            part = block[:part.shape[0]].copy_(part)
        scores = queries @ part.T  # (Q, B)
        if exclude is not None:
            for q, row in enumerate(exclude):
                if row is not None and begin <= row < begin + part.shape[0]:
                    scores[q, row - begin] = float("-inf")
        s, r = torch.topk(scores, min(k, part.shape[0]), dim=1)
        # Earlier blocks first: among equal scores topk keeps the lower row.
        best_scores, order = torch.topk(torch.cat([best_scores, s], dim=1), k, dim=1)
        best_rows = torch.cat([best_rows, r + begin], dim=1).gather(1, order)
    return best_scores, best_rows


_buffers = threading.local()


def _block_buffer(rows: int, dim: int) -> torch.Tensor:
    """This thread's float32 upcast buffer: allocating (and first-touching) 16 MB per query
    costs more than a single query's matmul."""
    buffer = getattr(_buffers, "block", None)
    if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != dim:
        buffer = _buffers.block = torch.empty((rows, dim), dtype=torch.float32)
    return buffer


@dataclass
class Searcher:
    """An index and the model that built it: composed queries in, ranked gallery rows out."""
    index: GalleryIndex
    model: torch.nn.Module
    cfg: Any
    device: torch.device

    @classmethod
    def load(cls, index: GalleryIndex) -> "Searcher":
        from composeae.checkpoint import load_checkpoint
        from composeae.run.build import model_from_checkpoint

        model, cfg = model_from_checkpoint(
            load_checkpoint(checkpoint_file(index.manifest["model"]["checkpoint"])))
        return cls(index, model, cfg, torch.device("cpu"))

    @property
    def version(self) -> int | None:
        return self.index.version

    def embed_query(self, image: bytes, text: str) -> np.ndarray:
        """The (D,) unit query embedding of reference image bytes and a modifier text."""
        from PIL import Image, UnidentifiedImageError

        from composeae.data.decode import SampleDecoder

        try:
            picture = Image.open(io.BytesIO(image))
            if picture.width * picture.height > MAX_PIXELS:
                raise UserError(f"the reference image is {picture.width} x {picture.height} "
                                f"pixels, more than the {MAX_PIXELS} accepted")
            picture.load()
            picture = picture.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise UserError(f"the reference image cannot be read ({type(exc).__name__})") from None
        pixels = SampleDecoder("gallery", self.cfg.data.image_size).pixels(picture)
        # As the evaluation embeds its queries: the Python API's one path.
        return Model(self.model, self.cfg, self.device).embed_pixels(pixels[None], [text])[0]

    def search(self, text: str, k: int = 10, *, ref: str | None = None,
               image: bytes | None = None) -> dict[str, Any]:
        """Top-k of one composed query: a gallery id (`ref`, itself left out of the results, as
        the evaluation leaves a query's reference out) or uploaded image bytes."""
        text = check_text(text)
        k = check_k(k, len(self.index))
        if (ref is None) == (image is None):
            raise UserError("give a reference: a gallery id or an image, not both")
        exclude = None
        if ref is not None:
            row = self.index.row(ref)
            image, _ = self.index.image(row)
            exclude = [row]
        query = torch.from_numpy(self.embed_query(image, text))[None]  # (1, D)
        scores, rows = top_k(query, self.index.embeddings, k, exclude=exclude)
        return {"version": self.version, "reference": ref, "text": text, "k": k,
                "results": [{"id": self.index.ids[r], "score": round(float(s), 6),
                             "label": self.index.labels[r]}
                            for s, r in zip(scores[0].tolist(), rows[0].tolist())]}


def check_text(text: str | None) -> str:
    text = (text or "").strip()
    if not text:
        raise UserError("the modifier text is missing or empty")
    if len(text) > MAX_TEXT:
        raise UserError(f"the modifier text is longer than {MAX_TEXT} characters")
    return text


def check_k(k: Any, size: int) -> int:
    """k as an int in 1..min(MAX_K, gallery size); `UserError` otherwise (also for 2.5, True)."""
    top = min(MAX_K, size)
    try:
        value = int(str(k).strip())
    except ValueError:
        value = 0
    if not 1 <= value <= top:
        raise UserError(f"k must be a whole number from 1 to {top}, got {k!r}")
    return value


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def render_page(searcher: Searcher, result: dict[str, Any], reference: tuple[bytes, str]) -> str:
    """A self-contained HTML page: the reference, the text, the k images with ids and scores."""
    figures = []
    for rank, item in enumerate(result["results"], 1):
        uri = _data_uri(*searcher.index.image(searcher.index.row(item["id"])))
        figures.append(
            f'<figure><img src="{uri}" alt="{html.escape(item["id"])}">'
            f'<figcaption>{rank}. {html.escape(item["id"])}<br>{item["score"]:.4f}</figcaption>'
            f'</figure>')
    version = result["version"]
    model = f"version {version}" if version is not None else html.escape(
        searcher.index.manifest["model"]["checkpoint"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>composeae search</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
figure {{ display: inline-block; margin: 0 .6em .8em 0; text-align: center; font-size: 12px; }}
img {{ width: 96px; height: 96px; image-rendering: pixelated; border: 1px solid #bbb; }}
.query img {{ border: 2px solid #333; }}
</style></head><body>
<h1>composeae search</h1>
<p>model {model}; index {html.escape(searcher.index.url)} ({len(searcher.index)} images)</p>
<div class="query"><figure><img src="{_data_uri(*reference)}" alt="reference">
<figcaption>reference{(' ' + html.escape(result['reference'])) if result['reference'] else ''}
</figcaption></figure> + <q>{html.escape(result['text'])}</q></div>
<h2>top {result['k']}</h2>
<div class="results">{''.join(figures)}</div>
</body></html>
"""
