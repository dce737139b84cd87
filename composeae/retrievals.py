"""What the model retrieves: the top-K gallery images of a few fixed queries, as an HTML section.

What belongs here: choosing the fixed queries of an evaluation split, ranking the gallery for them
by the hit rule of `composeae.evaluate` (the query's group only, its own reference image left out
when the dataset says so), reading just those images back from the shards, and drawing them.

`top_k` is pure: it takes the gathered embeddings and metadata that `evaluate.score` takes and
returns a JSON-able record (ids, similarities, hit flags), small enough to travel in a checkpoint
(`RETRIEVALS_FILE` in the final one) or through Ray. `render_section` turns a record into HTML
with the images inlined; it reads only the handful of images it shows.

The queries are the same for every run on a dataset: evenly spaced in the order of their query
ids, whatever the ranks and loader workers that gathered them. The order of the K images
resolves ties of similarity against the query, as `composeae.metrics` counts ranks: a correct
image tied with a wrong one is shown after it, so the page agrees with R@K.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

NUM_QUERIES = 6
"""Fixed queries shown per split."""
K = 5
"""Gallery images shown per query."""
RETRIEVALS_FILE = "retrievals.json"
"""Next to `history.json` in a run's final checkpoint: `top_k`'s record for the test split."""
THUMBNAIL = 128
"""Largest side of an image inlined in the page (larger images are shrunk, smaller kept)."""
SHOWN = 96
"""CSS pixels of an image's box on the page; smaller images are scaled up pixelated."""


def pick_queries(query_ids: list[str], n: int = NUM_QUERIES) -> list[int]:
    """Indices into `query_ids` of `n` queries evenly spaced in id order (all when fewer): the
    same queries whatever order the ranks gathered them in."""
    order = sorted(range(len(query_ids)), key=lambda i: query_ids[i])
    if n >= len(order):
        return order
    return [order[(2 * j + 1) * len(order) // (2 * n)] for j in range(n)]


def top_k(queries: dict[str, Any], gallery: dict[str, Any], *, num_queries: int = NUM_QUERIES,
          k: int = K, exclude_reference: bool = True, split: str = "") -> dict[str, Any]:
    """The K most similar gallery images of each fixed query, by the hit rule of the recall.

    queries / gallery: as `composeae.evaluate.score` gets them ("emb" (N, D) tensors and metadata
    lists). A query ranks the gallery images of its group, without the image of its reference id
    when `exclude_reference`; an image is correct (`hit`) when its label is the query's target
    label. Each query also carries `first_hit_rank` (0-based; the rank `first_hit_rank` of
    `composeae.metrics` gives it) and `first_hit_id`, None when no image of its gallery is correct.
    """
    picked = pick_queries(queries["query_id"], num_queries)
    record: dict[str, Any] = {"split": split, "k": k, "exclude_reference": exclude_reference,
                              "queries": []}
    if not picked or len(gallery["image_id"]) == 0:
        return record
    g_emb = F.normalize(gallery["emb"].float(), dim=1)
    q_emb = F.normalize(queries["emb"][picked].float(), dim=1)
    sims = torch.mm(q_emb, g_emb.T).numpy()  # (n, G): n is a handful
    g_ids = np.asarray(gallery["image_id"], dtype=object)
    g_labels = np.asarray(gallery["label"], dtype=object)
    g_groups = np.asarray(gallery["group"], dtype=object)
    for row, i in enumerate(picked):
        valid = g_groups == queries["group"][i]
        if exclude_reference:
            valid &= g_ids != queries["reference_id"][i]
        candidates = np.flatnonzero(valid)
        sim = sims[row, candidates]
        hit = g_labels[candidates] == queries["target_label"][i]
        # By similarity, highest first; among equal similarities the wrong images first.
        order = np.lexsort((hit, -sim))
        hits = np.flatnonzero(hit[order])
        first = int(hits[0]) if len(hits) else None
        record["queries"].append({
            "query_id": queries["query_id"][i],
            "reference_id": queries["reference_id"][i],
            "target_id": queries["target_id"][i],
            "target_label": queries["target_label"][i],
            "group": queries["group"][i],
            "top": [{"image_id": str(g_ids[candidates[j]]), "label": str(g_labels[candidates[j]]),
                     "similarity": round(float(sim[j]), 4), "hit": bool(hit[j])}
                    for j in order[:k]],
            "first_hit_rank": first,
            "first_hit_id": None if first is None else str(g_ids[candidates[order[first]]]),
        })
    return record


# --- images from the shards ----------------------------------------------------------------------

def _scan(shards: list[dict], wanted: set[str], id_key: str, image_key: str
          ) -> dict[str, tuple[bytes, dict]]:
    """{id: (image bytes, metadata)} of the wanted samples; stops once all are found."""
    from composeae.data import schema
    from composeae.data.tarstream import open_shard, tar_samples

    found: dict[str, tuple[bytes, dict]] = {}
    for shard in shards:
        if len(found) == len(wanted):
            break
        with open_shard(shard["url"]) as stream:
            for sample in tar_samples(stream, shard["url"]):
                meta = json.loads(sample[schema.META])
                sid = meta.get(id_key)
                if sid in wanted and sid not in found:
                    image = next((sample[f"{image_key}.{ext}"] for ext in schema.IMAGE_EXTS
                                  if f"{image_key}.{ext}" in sample), None)
                    if image is not None:
                        found[sid] = (image, meta)
                        if len(found) == len(wanted):
                            break
    return found


def read_images(data_url: str, record: dict[str, Any]
                ) -> tuple[dict[str, tuple[bytes, dict]], dict[str, bytes]]:
    """The record's images from the dataset's shards of its split: ({query id: (reference image
    bytes, query metadata)}, {gallery image id: image bytes}). Only the shards up to the last
    image needed are read."""
    from composeae.data import schema, shardset
    from composeae.data.shardset import read_manifest

    manifest = read_manifest(data_url)
    split = record["split"]
    wanted_q = {q["query_id"] for q in record["queries"]}
    wanted_g = {t["image_id"] for q in record["queries"] for t in q["top"]}
    wanted_g |= {q["first_hit_id"] for q in record["queries"] if q["first_hit_id"]}
    found_q = _scan(shardset.shard_list(data_url, manifest, split, schema.QUERIES), wanted_q,
                    "query_id", schema.REFERENCE)
    found_g = _scan(shardset.shard_list(data_url, manifest, split, schema.GALLERY), wanted_g,
                    "image_id", schema.IMAGE)
    return found_q, {k: v[0] for k, v in found_g.items()}


def thumbnail(data: bytes) -> tuple[str, int, int]:
    """Image bytes -> (data: URI, width, height), shrunk to `THUMBNAIL` pixels at most."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    fmt = "PNG" if image.format == "PNG" else "JPEG"
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    mime = "png" if fmt == "PNG" else "jpeg"
    return (f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}",
            image.width, image.height)


# --- HTML --------------------------------------------------------------------------------------

STYLE = f"""<style>
.retrievals .query{{display:flex;align-items:flex-start;gap:6px;margin:14px 0;
  padding-bottom:10px;border-bottom:1px solid #eee}}
.retrievals figure{{margin:0;width:{SHOWN + 12}px;text-align:center;font-size:11px;color:#444}}
.retrievals figure.reference{{width:{SHOWN + 60}px}}
.retrievals figure.reference figcaption{{font-size:12px;color:#000}}
.retrievals .frame{{display:inline-block;border:4px solid transparent;line-height:0}}
.retrievals img,.retrievals .none{{width:{SHOWN}px;height:{SHOWN}px;object-fit:contain;
  background:#f2f2f2;box-shadow:0 0 0 1px #d0d0d0}}
.retrievals img.px{{image-rendering:pixelated}}
.retrievals .none{{display:inline-block;line-height:{SHOWN}px;font-size:10px;color:#999}}
.retrievals figure.hit .frame{{border-color:#17a32b}}
.retrievals figure.target .frame{{border:4px dashed #17a32b}}
.retrievals .arrow{{align-self:center;font-size:22px;color:#888;padding:0 4px}}
.retrievals figcaption{{overflow-wrap:anywhere;margin-top:2px}}
.retrievals .legend .frame{{width:10px;height:10px;vertical-align:middle}}
</style>"""


def _image(uri: tuple[str, int, int] | None, title: str) -> str:
    if uri is None:
        return f'<span class="none" title="{html.escape(title)}">no image</span>'
    src, width, height = uri
    pixelated = ' class="px"' if max(width, height) < SHOWN else ""
    return f'<img{pixelated} src="{src}" alt="{html.escape(title)}" title="{html.escape(title)}">'


def _figure(kind: str, uri, title: str, caption: str) -> str:
    return (f'<figure class="{kind}"><span class="frame">{_image(uri, title)}</span>'
            f'<figcaption>{caption}</figcaption></figure>')


def render_section(record: dict[str, Any] | None, data_url: str,
                   heading: str = "What the model retrieves") -> str:
    """The retrieval section of a report page: per fixed query its reference image with the
    modifier text under it, then the top-K gallery images, the correct ones outlined in green;
    when none of them is correct, the best-ranked correct image follows, dashed, with its rank.
    Images are read from `data_url`'s shards; when they cannot be, the section says so and
    shows the ids."""
    if not record or not record.get("queries"):
        return ""
    uris: dict[str, Any] = {}
    references: dict[str, tuple[str, int, int]] = {}
    modifiers: dict[str, str] = {}
    problem = ""
    try:
        found_q, found_g = read_images(data_url, record)
        for qid, (data, meta) in found_q.items():
            references[qid] = thumbnail(data)
            modifiers[qid] = meta.get("modifier", "")
        uris = {gid: thumbnail(data) for gid, data in found_g.items()}
    except Exception as exc:  # the page is still worth having without its pictures
        log.warning("retrieval images could not be read from %s: %s", data_url, exc)
        problem = (f'<p class="problem">The images could not be read from '
                   f'<code>{html.escape(data_url)}</code>: {html.escape(str(exc))}</p>')
    k = record.get("k", K)
    kept = "" if record.get("exclude_reference", True) else (
        " The reference image stays in the ranking (the dataset's protocol).")
    rows = []
    for q in record["queries"]:
        qid = q["query_id"]
        modifier = modifiers.get(qid, "")
        cells = [_figure("reference", references.get(qid), f"{qid}: reference {q['reference_id']}",
                         f"&ldquo;{html.escape(modifier)}&rdquo;" if modifier
                         else html.escape(qid)),
                 '<span class="arrow">&rarr;</span>']
        for rank, t in enumerate(q["top"], 1):
            kind = "result hit" if t["hit"] else "result"
            cells.append(_figure(kind, uris.get(t["image_id"]),
                                 f"{t['image_id']} (label {t['label']})",
                                 f"{rank} &middot; {t['similarity']:.2f}"))
        first = q["first_hit_rank"]
        if first is None:
            cells.append('<figure class="unfound"><span class="frame"><span class="none">none'
                         '</span></span><figcaption>no correct image in its gallery</figcaption>'
                         '</figure>')
        elif first >= len(q["top"]):
            cells.append('<span class="arrow">&hellip;</span>')
            cells.append(_figure("target", uris.get(q["first_hit_id"]), q["first_hit_id"],
                                 f"correct at rank {first + 1}"))
        rows.append(f'<div class="query" data-query="{html.escape(qid)}">{"".join(cells)}</div>')
    legend = ('<span class="legend"><span class="frame" style="border-color:#17a32b">'
              '</span></span>')
    return f"""<section class="retrievals">
{STYLE}
<h2>{html.escape(heading)}</h2>
<p>{len(record["queries"])} fixed queries of the {html.escape(record.get("split", ""))} split
(the same for every run on this dataset): the reference image with the modifier text, then the
{k} gallery images of the query's group nearest to the composed query, with their cosine
similarity. {legend} a correct image (the query's target label). When none of the {k} is correct,
the best-ranked correct image follows, dashed, with its rank.{kept}</p>
{problem}{"".join(rows)}
</section>
"""


def load_record(checkpoint_url: str) -> dict[str, Any] | None:
    """The retrieval record in a checkpoint directory, None when it has none (older runs)."""
    from composeae import storage

    url = storage.join(checkpoint_url, RETRIEVALS_FILE)
    if not storage.exists(url):
        return None
    return json.loads(storage.read_text(url))
