"""CIRR (Liu et al. 2021), release rc2, with its validation protocol.

On disk, under the dataset root:

    cirr/captions/cap.rc2.{train,val,test1}.json
        a list of {pairid, reference, target_hard, target_soft, caption, img_set{members, ...}}
    cirr/image_splits/split.rc2.{train,val,test1}.json
        {image name: path relative to the image root, e.g. "./train/34/train-11041-2-img0.png"}
    the images: under the dataset root (the layout CLIP4Cir and its successors use) or under
    cirr/img_raw/ (the layout of the CIRR README); whichever holds the first training image.

Rules:
- Training triplets: every train pair, reference -> target_hard; the modifier is the caption.
  CIRR has no complete-text query, so the complete text is the caption as well.
- Evaluation is on val: one query per pair and the gallery of every val image. Hits are id-level
  (label = image name) and the reference image is removed from the gallery (the schema's
  exclusion rule).
- test1 has no targets (its ground truth stays on the evaluation server), so it is not converted.
- Each query carries its img_set members as `subset`, for Recall_subset@K (the reference is
  removed from the subset at evaluation).
"""

from __future__ import annotations

from pathlib import Path

from composeae.data import schema
from composeae.data.schema import GalleryMeta, QueryMeta, TripletMeta
from composeae.data.sources.common import (PlannedImage, PlannedQuery, PlannedTriplet, entry_field,
                                           file_error, json_list, plan_counts, read_json,
                                           register_converter, write_plan)
from composeae.errors import UserError

NAME = "cirr"
RELEASE = "rc2"


def annotation_dir(src: Path) -> Path:
    return src / "cirr"


def read_split(src: Path, split: str) -> tuple[Path, dict[str, str]]:
    """The image split of `split`: image name -> relative path."""
    path = annotation_dir(src) / "image_splits" / f"split.{RELEASE}.{split}.json"
    names = read_json(path, f"CIRR {split} image split")
    if not isinstance(names, dict):
        raise file_error(path, None, f"expected a JSON object mapping image names to paths, "
                                     f"found {type(names).__name__}")
    for name, rel in names.items():
        if not isinstance(rel, str) or not rel:
            raise file_error(path, None, f"image {name!r}: expected a relative path string")
    return path, names


def read_pairs(src: Path, split: str, names: dict[str, str], split_file: Path) -> list[dict]:
    """The pairs of one caption file, checked against the split's image names."""
    path = annotation_dir(src) / "captions" / f"cap.{RELEASE}.{split}.json"
    pairs = json_list(path, f"CIRR {split} captions")
    for i, pair in enumerate(pairs):
        entry_field(path, i, pair, "pairid", int)
        entry_field(path, i, pair, "caption", str)
        members = entry_field(path, i, entry_field(path, i, pair, "img_set", dict), "members", list)
        if not all(isinstance(m, str) for m in members):
            raise file_error(path, None, f"entry {i}: img_set members must be image names")
        for field in ("reference", "target_hard"):
            name = entry_field(path, i, pair, field, str)
            if name not in names:
                raise file_error(path, None, f"entry {i} (pairid {pair['pairid']}): {field} {name!r} "
                                             f"is not in {split_file.name}")
    return pairs


def image_root(src: Path, rel_path: str) -> Path:
    """The directory the split files' relative paths start from (see the module docstring)."""
    candidates = (src, annotation_dir(src) / "img_raw")
    for root in candidates:
        if (root / rel_path).is_file():
            return root
    raise UserError(f"missing image: {rel_path} is under none of " + ", ".join(str(c) for c in candidates))


@register_converter(NAME)
def convert(src: Path, out_url: str, *, shard_size: int = 1000, seed: int = 0) -> dict:
    """CIRR -> train triplets and val queries/gallery (id-level hits, reference excluded);
    training triplets are written in an order shuffled with `seed`."""
    train_file, train_names = read_split(src, "train")
    val_file, val_names = read_split(src, "val")
    train_pairs = read_pairs(src, "train", train_names, train_file)
    val_pairs = read_pairs(src, "val", val_names, val_file)
    if not train_pairs:
        raise file_error(src / "cirr" / "captions" / f"cap.{RELEASE}.train.json", None, "no pairs")
    root = image_root(src, train_names[train_pairs[0]["reference"]])

    triplets = [
        PlannedTriplet(root / train_names[p["reference"]], root / train_names[p["target_hard"]],
                       TripletMeta(reference_id=p["reference"], target_id=p["target_hard"],
                                   modifier=p["caption"], complete=p["caption"],
                                   target_label=p["target_hard"]))
        for p in train_pairs
    ]
    queries = [
        PlannedQuery(root / val_names[p["reference"]],
                     QueryMeta(query_id=str(p["pairid"]), reference_id=p["reference"],
                               modifier=p["caption"], complete=p["caption"],
                               target_label=p["target_hard"], target_id=p["target_hard"],
                               subset=tuple(p["img_set"]["members"])))
        for p in val_pairs
    ]
    gallery = [PlannedImage(root / rel, GalleryMeta(image_id=name, label=name))
               for name, rel in val_names.items()]
    plan = {schema.TRAIN_SPLIT: {schema.TRIPLETS: triplets},
            "val": {schema.QUERIES: queries, schema.GALLERY: gallery}}
    params = {
        "converter": NAME,
        "release": RELEASE,
        "hits": "id",
        "hit_rule": "a gallery image answers a query when its name equals target_hard; "
                    "the reference image is excluded",
        schema.EXCLUDE_REFERENCE: True,
        "splits": "train and val; test1 is not converted (no targets: evaluation-server only)",
        "complete_text": "the caption (CIRR has no complete-text query)",
        "recall_subset": "queries carry img_set members as `subset`",
        "image_root": "dataset root" if root == src else "cirr/img_raw",
        "seed": seed,
        "counts": plan_counts(plan),
    }
    return write_plan(out_url, NAME, plan, params, shard_size=shard_size, seed=seed)
