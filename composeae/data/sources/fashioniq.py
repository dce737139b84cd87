"""FashionIQ (Wu et al. 2021) with the standard per-category validation protocol.

On disk, under the dataset root:

    captions/cap.{dress,shirt,toptee}.{train,val,test}.json
        a list of {"candidate": asin, "target": asin, "captions": [c1, c2]}
    image_splits/split.{dress,shirt,toptee}.{train,val,test}.json    a list of asins
    images/<asin>.jpg (or .png)

Rules:
- Training triplets: every entry of the train caption files, candidate -> target.
- The modifier joins the two captions as CLIP4Cir and its successors do at evaluation:
  `c1.strip('.?, ').capitalize() + " and " + c2.strip('.?, ')`. The complete text is ComposeAE's
  `("<category> " + " and it ".join(captions)).lower()`.
- Evaluation is on the val split (the test captions have no targets; the published numbers are
  val numbers). Each category is its own gallery, the images of split.<category>.val.json, and
  `group` is the category: the standard protocol. The manifest also asks for ComposeAE's joint
  gallery (the three categories' images together), reported beside it under its own keys, since
  the paper's 11.8 / 29.4 were measured that way. Hits are id-level: label = asin.
- The reference image stays in the ranking: neither the official ComposeAE evaluation nor the
  common one (CLIP4Cir's) removes it for FashionIQ, so the manifest turns exclusion off.
- About 4% of the published images cannot be downloaded any more. A triplet or query whose
  reference or target image is missing, and a gallery image that is missing, is skipped and
  counted; the counts are in the manifest and in one warning line.
"""

from __future__ import annotations

from pathlib import Path

from composeae.data import schema
from composeae.data.schema import GalleryMeta, QueryMeta, TripletMeta
from composeae.data.sources.common import (PlannedImage, PlannedQuery, PlannedTriplet, entry_field,
                                           file_error, find_image, json_list, plan_counts,
                                           register_converter, require_dir, warn_skipped, write_plan)

NAME = "fashioniq"
CATEGORIES = ("dress", "shirt", "toptee")
IMAGE_EXTS = ("jpg", "png")


def modifier_text(captions: list[str]) -> str:
    first, *rest = [c.strip(".?, ") for c in captions]
    return " and ".join([first.capitalize(), *rest])


def complete_text(category: str, captions: list[str]) -> str:
    return f"{category} {' and it '.join(captions)}".lower()


class Images:
    """Finds `images/<asin>.{jpg,png}` once per asin and counts the ones that are missing."""

    def __init__(self, src: Path) -> None:
        self.root = require_dir(src / "images", "FashionIQ images directory")
        self._found: dict[str, Path | None] = {}

    def find(self, asin: str) -> Path | None:
        if asin not in self._found:
            self._found[asin] = find_image(self.root / asin, IMAGE_EXTS)
        return self._found[asin]

    @property
    def missing(self) -> int:
        return sum(p is None for p in self._found.values())


def read_captions(src: Path, category: str, split: str) -> tuple[Path, list[dict]]:
    """Entries of one caption file, each checked to have candidate, target and captions."""
    path = src / "captions" / f"cap.{category}.{split}.json"
    entries = json_list(path, f"FashionIQ {category} {split} captions")
    for i, entry in enumerate(entries):
        entry_field(path, i, entry, "candidate", str)
        entry_field(path, i, entry, "target", str)
        captions = entry_field(path, i, entry, "captions", list)
        if not captions or not all(isinstance(c, str) for c in captions):
            raise file_error(path, None, f"entry {i}: 'captions' must be a non-empty list of strings")
    return path, entries


def read_split(src: Path, category: str, split: str) -> list[str]:
    """The asins of one image split, without repeats, in file order."""
    path = src / "image_splits" / f"split.{category}.{split}.json"
    asins = json_list(path, f"FashionIQ {category} {split} image split")
    for i, asin in enumerate(asins):
        if not isinstance(asin, str):
            raise file_error(path, None, f"entry {i}: expected an asin string, found {type(asin).__name__}")
    return list(dict.fromkeys(asins))


def plan_train(src: Path, images: Images) -> tuple[list[PlannedTriplet], int]:
    triplets, skipped = [], 0
    for category in CATEGORIES:
        _, entries = read_captions(src, category, "train")
        for entry in entries:
            reference, target = images.find(entry["candidate"]), images.find(entry["target"])
            if reference is None or target is None:
                skipped += 1
                continue
            meta = TripletMeta(reference_id=entry["candidate"], target_id=entry["target"],
                               modifier=modifier_text(entry["captions"]),
                               complete=complete_text(category, entry["captions"]),
                               target_label=entry["target"], group=category)
            triplets.append(PlannedTriplet(reference, target, meta))
    return triplets, skipped


def plan_val(src: Path, images: Images) -> tuple[list[PlannedQuery], list[PlannedImage], int, int]:
    queries, gallery, skipped_queries, skipped_gallery = [], [], 0, 0
    for category in CATEGORIES:
        for asin in read_split(src, category, "val"):
            path = images.find(asin)
            if path is None:
                skipped_gallery += 1
                continue
            gallery.append(PlannedImage(path, GalleryMeta(image_id=asin, label=asin, group=category)))
        _, entries = read_captions(src, category, "val")
        for i, entry in enumerate(entries):
            reference = images.find(entry["candidate"])
            # A query whose target image is missing can never be answered: the target is not in
            # the gallery either.
            if reference is None or images.find(entry["target"]) is None:
                skipped_queries += 1
                continue
            meta = QueryMeta(query_id=f"{category}-{i}", reference_id=entry["candidate"],
                             modifier=modifier_text(entry["captions"]),
                             complete=complete_text(category, entry["captions"]),
                             target_label=entry["target"], target_id=entry["target"], group=category)
            queries.append(PlannedQuery(reference, meta))
    return queries, gallery, skipped_queries, skipped_gallery


@register_converter(NAME)
def convert(src: Path, out_url: str, *, shard_size: int = 1000, seed: int = 0) -> dict:
    """FashionIQ -> train triplets and val queries/galleries, one gallery per category (and the
    joint one); training triplets are written in an order shuffled with `seed`."""
    images = Images(src)
    triplets, skipped_triplets = plan_train(src, images)
    queries, gallery, skipped_queries, skipped_gallery = plan_val(src, images)
    plan = {schema.TRAIN_SPLIT: {schema.TRIPLETS: triplets},
            "val": {schema.QUERIES: queries, schema.GALLERY: gallery}}
    skipped = {"train triplets": skipped_triplets, "val queries": skipped_queries,
               "val gallery images": skipped_gallery}
    warn_skipped(NAME, skipped, f"{images.missing} referenced images are missing; the published "
                                f"FashionIQ image set is incomplete")
    params = {
        "converter": NAME,
        "hits": "id",
        "hit_rule": "a gallery image answers a query when its asin equals the target asin, "
                    "within the query's category",
        "splits": "train and val; val is the evaluated split (test captions have no targets)",
        "groups": "one gallery per category: " + ", ".join(CATEGORIES),
        schema.EXCLUDE_REFERENCE: False,
        schema.JOINT_GALLERY: True,
        "galleries": "R@K: per category (mean over categories, the standard protocol); "
                     "joint/R@K: the three categories in one gallery (ComposeAE's protocol)",
        "modifier": "c1.strip('.?, ').capitalize() + ' and ' + c2.strip('.?, ')",
        "complete_text": "('<category> ' + ' and it '.join(captions)).lower()",
        "missing_images": images.missing,
        "skipped": skipped,
        "seed": seed,
        "counts": plan_counts(plan),
    }
    return write_plan(out_url, NAME, plan, params, shard_size=shard_size, seed=seed)
