"""Search: a composed query (reference image + modifier text) against a gallery index.

What belongs here: loading the model an index was built with, embedding queries the way the
evaluation embeds its queries (`SampleDecoder.pixels`, `normalise`, `evaluate.embed`), the
exact top-k by inner product, the choice between exact, approximate (`ann.ann_top_k`, with its
`probe` and `rerank` knobs) and sharded (`sharded.ShardedGallery`) ranking, and the HTML page of
one result. Nothing here knows about HTTP.

A search is two steps so that a service can batch them: `prepare` checks one request and
decodes its reference (per request: a bad image fails that request alone), `answer` embeds a
list of prepared queries in one forward pass and ranks them in one matmul or index call.

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
from composeae.serve.ann import ann_top_k, check_knobs
from composeae.serve.index import GalleryIndex, checkpoint_file

BLOCK_ROWS = {torch.float32: 65536, torch.float16: 8192}
"""Gallery rows scored at once. Float32: (Q, 65536) scores per block, few merges. Float16:
8192 x 512 rows upcast into a 16 MB buffer, mostly cache-resident until the matmul reads it."""
MAX_K = 1000
MAX_TEXT = 500
"""Characters of modifier text accepted."""
MAX_PIXELS = 4096 * 4096
"""Largest reference image accepted (width x height), checked before it is decoded."""
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
"""The only decoders a reference image is offered to (Pillow knows formats that hand the bytes
to other programs, EPS to Ghostscript)."""


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


def use_assigned_cpus() -> int:
    """Inside a Ray actor (a replica, a shard): search with as many threads as the CPUs Ray
    assigned it (at least one), not one per core of the machine. Ray leaves OMP_NUM_THREADS
    unset in Serve replicas, and a matmul or FAISS search split over more threads than the
    process's share of shared cores waits on descheduled threads (measured: a batched search
    slower than one query at a time). Returns the threads."""
    import ray

    context = ray.get_runtime_context() if ray.is_initialized() else None
    if context is None or context.get_actor_id() is None:
        return torch.get_num_threads()  # not an actor: the caller's own setting stays
    cpus = context.get_assigned_resources().get("CPU", 1.0)
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    try:
        import faiss
    except ImportError:
        return threads
    faiss.omp_set_num_threads(threads)
    return threads


_buffers = threading.local()


def _block_buffer(rows: int, dim: int) -> torch.Tensor:
    """This thread's float32 upcast buffer: allocating (and first-touching) 16 MB per query
    costs more than a single query's matmul."""
    buffer = getattr(_buffers, "block", None)
    if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != dim:
        buffer = _buffers.block = torch.empty((rows, dim), dtype=torch.float32)
    return buffer


@dataclass(frozen=True)
class Query:
    """One checked request: the reference's pixels (S, S, 3) uint8, the text, k, and the
    gallery row to leave out (the reference named by id), if any."""
    text: str
    k: int
    ref: str | None
    pixels: torch.Tensor
    exclude: int | None


@dataclass
class Searcher:
    """An index and the model that built it: composed queries in, ranked gallery rows out.

    Ranking: `gallery` (a `ShardedGallery`) when the rows are held by shard actors; else the
    index's approximate index with `knobs` = (probe, rerank) when it has one and `exact` is not
    asked for; else exact `top_k` over the index's rows."""
    index: GalleryIndex
    model: torch.nn.Module
    cfg: Any
    device: torch.device
    knobs: tuple[int, int] | None = None
    gallery: Any = None

    @classmethod
    def load(cls, index: GalleryIndex, *, probe: Any = None, rerank: Any = None,
             exact: bool = False, gallery: Any = None) -> "Searcher":
        from composeae.checkpoint import load_checkpoint
        from composeae.run.build import model_from_checkpoint

        knobs = None
        if not exact and gallery is None:
            knobs = check_knobs(index.ann_entry if index.ann is not None else None, probe,
                                rerank)
        model, cfg = model_from_checkpoint(
            load_checkpoint(checkpoint_file(index.manifest["model"]["checkpoint"]),
                            sha256=index.manifest["model"].get("checkpoint_sha256")))
        return cls(index, model, cfg, torch.device("cpu"), knobs, gallery)

    @property
    def version(self) -> int | None:
        return self.index.version

    @property
    def method(self) -> str:
        """How this searcher ranks, in words (for /status and the command line)."""
        if self.gallery is not None:
            return f"exact, {self.gallery.shards} shards"
        if self.knobs is not None:
            return (f"{self.index.ann_entry['factory']}, probe {self.knobs[0]}, "
                    f"rerank {self.knobs[1]}")
        return "exact"

    def reference_pixels(self, image: bytes) -> torch.Tensor:
        """(S, S, 3) uint8 pixels of reference image bytes; `UserError` when unreadable."""
        from PIL import Image

        from composeae.data.decode import SampleDecoder

        try:
            picture = Image.open(io.BytesIO(image), formats=IMAGE_FORMATS)
            if picture.width * picture.height > MAX_PIXELS:
                raise UserError(f"the reference image is {picture.width} x {picture.height} "
                                f"pixels, more than the {MAX_PIXELS} accepted")
            picture.load()
            picture = picture.convert("RGB")
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder's failure on bytes from outside
            raise UserError(f"the reference image cannot be read as "
                            f"{', '.join(IMAGE_FORMATS)} ({type(exc).__name__})") from None
        return SampleDecoder("gallery", self.cfg.data.image_size).pixels(picture)

    def embed_queries(self, pixels: list[torch.Tensor], texts: list[str]) -> np.ndarray:
        """(Q, D) unit query embeddings of references' pixels and modifier texts, one batch
        (the Python API's path: as the evaluation embeds its queries)."""
        return Model(self.model, self.cfg, self.device).embed_pixels(
            torch.stack(pixels), texts, batch=len(pixels))

    def embed_query(self, image: bytes, text: str) -> np.ndarray:
        """The (D,) unit query embedding of reference image bytes and a modifier text."""
        return self.embed_queries([self.reference_pixels(image)], [text])[0]

    def rank(self, queries: torch.Tensor, k: int, exclude: list[int | None] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, rows) (Q, k) of queries (Q, D); a row of -1 where fewer than k were found."""
        if self.gallery is not None:
            return self.gallery.top_k(queries, k, exclude)
        if self.knobs is not None:
            return ann_top_k(self.index.ann, self.index.ann_entry["kind"], self.index.embeddings,
                             queries, k, *self.knobs, exclude)
        return top_k(queries, self.index.embeddings, k, exclude=exclude)

    def prepare(self, text: str, k: Any = 10, *, ref: str | None = None,
                image: bytes | None = None) -> Query:
        """One request checked and its reference decoded: a gallery id (`ref`, itself left out
        of the results, as the evaluation leaves a query's reference out) or image bytes."""
        text = check_text(text)
        k = check_k(k, len(self.index))
        if (ref is None) == (image is None):
            raise UserError("give a reference: a gallery id or an image, not both")
        exclude = None
        if ref is not None:
            exclude = self.index.row(ref)
            image, _ = self.index.image(exclude)
        return Query(text, k, ref, self.reference_pixels(image), exclude)

    def answer(self, queries: list[Query]) -> list[dict[str, Any]]:
        """The results of prepared queries: one embedding batch, one ranking call."""
        emb = torch.from_numpy(self.embed_queries([q.pixels for q in queries],
                                                  [q.text for q in queries]))  # (Q, D)
        scores, rows = self.rank(emb, max(q.k for q in queries), [q.exclude for q in queries])
        return [{"version": self.version, "reference": q.ref, "text": q.text, "k": q.k,
                 "results": [{"id": self.index.ids[r], "score": round(float(s), 6),
                              "label": self.index.labels[r]}
                             for s, r in zip(scores[i, :q.k].tolist(), rows[i, :q.k].tolist())
                             if r >= 0]}
                for i, q in enumerate(queries)]

    def search(self, text: str, k: Any = 10, *, ref: str | None = None,
               image: bytes | None = None) -> dict[str, Any]:
        """Top-k of one composed query (`prepare`, then `answer`)."""
        return self.answer([self.prepare(text, k, ref=ref, image=image)])[0]


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
