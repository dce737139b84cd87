"""What the model retrieves, as an HTML section: the top-K gallery images of a few fixed queries.

What belongs here: reading just the images of a retrieval record (`composeae.evaluate.top_k`'s,
ids, similarities and hit flags) back from the dataset's shards, and drawing them. It reads only
the handful of images it shows.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from typing import Any

from PIL import Image

from composeae.data import schema, shardset
from composeae.data.tarstream import open_shard, tar_samples
from composeae.evaluate import K

log = logging.getLogger(__name__)

THUMBNAIL = 128
"""Largest side of an image inlined in the page (larger images are shrunk, smaller kept)."""
SHOWN = 96
"""CSS pixels of an image's box on the page; smaller images are scaled up pixelated."""


# --- images from the shards ----------------------------------------------------------------------

def _scan(shards: list[dict], wanted: set[str], id_key: str, image_key: str
          ) -> dict[str, tuple[bytes, dict]]:
    """{id: (image bytes, metadata)} of the wanted samples; stops once all are found."""
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
    manifest = shardset.read_manifest(data_url)
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
