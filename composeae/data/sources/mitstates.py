"""MIT-States (Isola et al. 2015) with the noun split and query rules of TIRG.

On disk, under the dataset root: `images/<adj> <noun>/*.jpg`. Directories whose name has no space
and the `adj <noun>` directories (images of the bare noun) are not used.

Rules (TIRG `datasets.py:MITStates`, reused by ComposeAE):
- The 49 nouns in `TEST_NOUNS` are the test split; every other noun trains.
- A training pair goes from an image to an image of the same noun with a different adjective; the
  modifier is the target adjective and the complete text "<target adj> <noun>". Pairs are drawn
  at every pass by the stream (`composeae.data.pairing`, rule "mitstates"), as the original drew
  them at every step: two targets of different adjectives per reference, the two pairs in one
  batch. The train split therefore holds one *group* per training noun with at least two
  adjectives: all its images. Deliberate difference: the original's random target adjective
  could be the reference's own (a "modification" to the same state); here it is always another.
- Test queries: every test image with every other adjective of its noun. The gallery is every
  test image. Hits are caption-level ("<adj> <noun>" equals the target's), the query's own
  reference image excluded.

MIT-States has no validation split, so the shards hold only "train" and "test".
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from composeae.data import schema
from composeae.data.pairing import PAIRS_PER_REFERENCE
from composeae.data.schema import GalleryMeta, GroupMeta, QueryMeta
from composeae.data.sources.common import (PlannedGroup, PlannedImage, PlannedQuery, plan_counts,
                                           register_converter, require_dir, write_plan)
from composeae.errors import UserError

NAME = "mitstates"

TEST_NOUNS = frozenset((
    "armor", "bracelet", "bush", "camera", "candy", "castle", "ceramic", "cheese", "clock",
    "clothes", "coffee", "fan", "fig", "fish", "foam", "forest", "fruit", "furniture", "garden",
    "gate", "glass", "horse", "island", "laptop", "lead", "lightning", "mirror", "orange", "paint",
    "persimmon", "plastic", "plate", "potato", "road", "rubber", "sand", "shell", "sky", "smoke",
    "steel", "stream", "table", "tea", "tomato", "vacuum", "wax", "wheel", "window", "wool",
))

# The original asserted that every file is a .jpg; other image extensions are accepted here,
# anything else (stray files from unpacking) is counted and left out.
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class StateImage:
    image_id: str
    """`<adj> <noun>/<file>`, relative to images/."""
    path: Path
    adj: str
    noun: str

    @property
    def caption(self) -> str:
        return f"{self.adj} {self.noun}"


def read_images(src: Path) -> tuple[list[StateImage], int]:
    """All usable images in directory-name and file-name order, and the number of non-image
    files left out."""
    root = require_dir(src / "images", "MIT-States images directory")
    images, ignored = [], 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        words = folder.name.split()
        if len(words) < 2 or words[0] == "adj":
            continue
        if len(words) > 2:
            raise UserError(f"MIT-States directory name is not '<adj> <noun>': {folder}")
        adj, noun = words
        for file in sorted(folder.iterdir()):
            if file.name.startswith(".") or not file.is_file():
                continue
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                ignored += 1
                continue
            images.append(StateImage(f"{folder.name}/{file.name}", file, adj, noun))
    return images, ignored


class CaptionIndex:
    """The images of each "<adj> <noun>" caption and the adjectives of each noun."""

    def __init__(self, images: list[StateImage]) -> None:
        self.images_of: dict[str, list[StateImage]] = defaultdict(list)
        self.adjs_of: dict[str, list[str]] = defaultdict(list)
        for image in images:
            self.images_of[image.caption].append(image)
            if image.adj not in self.adjs_of[image.noun]:
                self.adjs_of[image.noun].append(image.adj)

    def other_adjs(self, image: StateImage) -> list[str]:
        return [a for a in self.adjs_of[image.noun] if a != image.adj]


def plan_train(images: list[StateImage]) -> list[PlannedGroup]:
    """One group per noun with at least two adjectives: its images, captions "<adj> <noun>"."""
    index = CaptionIndex(images)
    groups = []
    for noun, adjs in index.adjs_of.items():
        if len(adjs) < 2:
            continue  # no other state to modify to
        captions = [f"{adj} {noun}" for adj in adjs]
        members = [(image, c) for c, caption in enumerate(captions)
                   for image in index.images_of[caption]]
        meta = GroupMeta(key=noun, rule=NAME, image_ids=tuple(im.image_id for im, _ in members),
                         captions=tuple(captions), caption_of=tuple(c for _, c in members),
                         texts=tuple(adjs) + tuple(captions))
        groups.append(PlannedGroup(tuple(im.path for im, _ in members), meta))
    return groups


def plan_test(images: list[StateImage]) -> tuple[list[PlannedQuery], list[PlannedImage]]:
    index = CaptionIndex(images)
    queries = []
    for reference in images:
        for adj in index.other_adjs(reference):
            caption = f"{adj} {reference.noun}"
            meta = QueryMeta(query_id=f"{reference.image_id}->{adj}", reference_id=reference.image_id,
                             modifier=adj, complete=caption, target_label=caption)
            queries.append(PlannedQuery(reference.path, meta))
    gallery = [PlannedImage(im.path, GalleryMeta(image_id=im.image_id, label=im.caption, caption=im.caption))
               for im in images]
    return queries, gallery


@register_converter(NAME)
def convert(src: Path, out_url: str, *, shard_size: int = 10, seed: int = 0) -> dict:
    """MIT-States -> train pairing groups and test queries/gallery (caption-level hits).

    A train shard holds `shard_size` nouns (a few hundred images each)."""
    images, ignored = read_images(src)
    train = [im for im in images if im.noun not in TEST_NOUNS]
    test = [im for im in images if im.noun in TEST_NOUNS]
    if not train or not test:
        raise UserError(f"MIT-States under {src} has {len(train)} training and {len(test)} test "
                        f"images; both splits need images")
    groups = plan_train(train)
    if not groups:
        raise UserError(f"MIT-States under {src}: no training noun has two adjectives")
    queries, gallery = plan_test(test)
    plan = {schema.TRAIN_SPLIT: {schema.GROUPS: groups},
            "test": {schema.QUERIES: queries, schema.GALLERY: gallery}}
    references = sum(len(g.images) for g in groups)
    params = {
        "converter": NAME,
        "hits": "caption",
        "hit_rule": "a gallery image answers a query when its '<adj> <noun>' equals the target's",
        schema.EXCLUDE_REFERENCE: True,
        "splits": "train and test (49 held-out test nouns); MIT-States has no validation split",
        "pairing_rule": "same noun, different adjective, drawn at every pass: two targets of "
                        "different adjectives per reference, in one batch; modifier = target "
                        "adjective",
        schema.PAIRING: {"rule": NAME, "references": references,
                         "pairs_per_epoch": references * PAIRS_PER_REFERENCE[NAME]},
        "complete_text": "<target adjective> <noun>",
        "seed": seed,
        "train_images": len(train),
        "test_images": len(test),
        "ignored_non_image_files": ignored,
        "counts": plan_counts(plan),
    }
    return write_plan(out_url, NAME, plan, params, shard_size=shard_size, seed=seed)
