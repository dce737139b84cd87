"""MIT-States (Isola et al. 2015) with the noun split and query rules of TIRG.

On disk, under the dataset root: `images/<adj> <noun>/*.jpg`. Directories whose name has no space
and the `adj <noun>` directories (images of the bare noun) are not used.

Rules (TIRG `datasets.py:MITStates`, reused by ComposeAE):
- The 49 nouns in `TEST_NOUNS` are the test split; every other noun trains.
- A training pair goes from an image to an image of the same noun with a different adjective; the
  modifier is the target adjective and the complete text "<target adj> <noun>". The original drew
  a random target adjective at every step (its own adjective included); shards hold
  `targets_per_reference` distinct other adjectives per reference image, drawn with `seed`, each
  with a random image of that adjective and noun.
- Test queries: every test image with every other adjective of its noun. The gallery is every
  test image. Hits are caption-level ("<adj> <noun>" equals the target's), the query's own
  reference image excluded.

MIT-States has no validation split, so the shards hold only "train" and "test".
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from composeae.data.schema import GalleryMeta, QueryMeta, TripletMeta
from composeae.data.sources.common import (PlannedImage, PlannedQuery, PlannedTriplet, plan_counts,
                                           register_converter, require_dir, require_positive, write_plan)
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


def plan_train(images: list[StateImage], targets_per_reference: int, seed: int) -> list[PlannedTriplet]:
    index = CaptionIndex(images)
    rng = random.Random(seed)
    triplets = []
    for reference in images:
        others = index.other_adjs(reference)
        for adj in rng.sample(others, min(targets_per_reference, len(others))):
            caption = f"{adj} {reference.noun}"
            target = rng.choice(index.images_of[caption])
            meta = TripletMeta(reference_id=reference.image_id, target_id=target.image_id,
                               modifier=adj, complete=caption, target_label=caption)
            triplets.append(PlannedTriplet(reference.path, target.path, meta))
    return triplets


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
def convert(src: Path, out_url: str, *, shard_size: int = 1000, targets_per_reference: int = 2,
            seed: int = 0) -> dict:
    """MIT-States -> train triplets and test queries/gallery (caption-level hits)."""
    require_positive("targets_per_reference", targets_per_reference)
    images, ignored = read_images(src)
    train = [im for im in images if im.noun not in TEST_NOUNS]
    test = [im for im in images if im.noun in TEST_NOUNS]
    if not train or not test:
        raise UserError(f"MIT-States under {src} has {len(train)} training and {len(test)} test "
                        f"images; both splits need images")
    queries, gallery = plan_test(test)
    plan = {"train": {"triplets": plan_train(train, targets_per_reference, seed)},
            "test": {"queries": queries, "gallery": gallery}}
    params = {
        "converter": NAME,
        "hits": "caption",
        "hit_rule": "a gallery image answers a query when its '<adj> <noun>' equals the target's",
        "splits": "train and test (49 held-out test nouns); MIT-States has no validation split",
        "pairing": "same noun, different adjective; modifier = target adjective",
        "complete_text": "<target adjective> <noun>",
        "targets_per_reference": targets_per_reference,
        "seed": seed,
        "train_images": len(train),
        "test_images": len(test),
        "ignored_non_image_files": ignored,
        "counts": plan_counts(plan),
    }
    return write_plan(out_url, NAME, plan, params, shard_size=shard_size)
