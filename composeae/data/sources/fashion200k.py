"""Fashion200k (Han et al. 2017) in the layout and with the pairing rules TIRG introduced.

On disk, under the dataset root:

    labels/{dress,jacket,pants,skirt,top}_{train,test}_detect_all.txt
        one image per line: `women/<cat>/<sub>/<id>/<id>_<n>.jpeg<TAB><score><TAB><caption>`
    test_queries.txt     `source_path target_path` per line (the fixed test queries)
    women/...            the images, at the paths the label files give

Rules (TIRG `datasets.py:Fashion200k`, which ComposeAE reuses):
- Captions are post-processed: `.` -> `dotmark`, `?` -> `questionmark`, `&` -> `andmark`,
  `*` -> `starmark`.
- A *parent* caption is a caption with one word removed. Two captions sharing a parent are
  siblings; an image whose caption has a sibling is modifiable. A training pair goes from a
  modifiable image to an image of a sibling caption, drawn as the original sampler did: a random
  parent of the reference caption, a random child of it other than the reference caption, a random
  image of that child. The original drew a new pair at every step; shards hold
  `targets_per_reference` distinct target captions per reference image, drawn with `seed`.
- The modifier is "replace <w_src> with <w_tgt>": the first reference word missing from the target
  caption and the first target word missing from the reference caption. The complete text is the
  target caption.
- Test: the queries of test_queries.txt; the gallery is every test image. Hits are caption-level:
  a gallery image answers a query when its caption equals the target caption (the reported
  protocol), and the query's own reference image is excluded.

Deliberate differences from the original, each noted where it happens: parents remove one word
*token* (the original removed every substring occurrence of the word, which mangles captions
where the word occurs inside another word), and training pairs whose captions have no differing
word are dropped (the original then fell back to the captions' last words).

Fashion200k has no validation split, so the shards hold only "train" and "test".
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from composeae.data.schema import GalleryMeta, QueryMeta, TripletMeta
from composeae.data.sources.common import (PlannedImage, PlannedQuery, PlannedTriplet, file_error,
                                           plan_counts, register_converter, require_dir,
                                           require_positive, text_lines, write_plan)

NAME = "fashion200k"
CATEGORIES = ("dress", "jacket", "pants", "skirt", "top")
_PUNCTUATION_WORDS = ((".", "dotmark"), ("?", "questionmark"), ("&", "andmark"), ("*", "starmark"))


@dataclass(frozen=True)
class LabeledImage:
    path: str
    """Relative to the dataset root, exactly as the label file gives it; also the image id."""
    caption: str


def post_process(caption: str) -> str:
    caption = caption.strip()
    for mark, word in _PUNCTUATION_WORDS:
        caption = caption.replace(mark, word)
    return caption


def label_file(src: Path, category: str, split: str) -> Path:
    return src / "labels" / f"{category}_{split}_detect_all.txt"


def read_labels(src: Path, split: str) -> list[LabeledImage]:
    """Every image of a split, in category order and then file order."""
    require_dir(src / "labels", "Fashion200k labels directory")
    images = []
    for category in CATEGORIES:
        path = label_file(src, category, split)
        for number, line in text_lines(path, f"Fashion200k {split} label file"):
            images.append(_parse_label_line(path, number, line))
    return images


def _parse_label_line(path: Path, number: int, line: str) -> LabeledImage:
    # Only the first three fields are read, as in the original loader.
    fields = line.split("\t")
    if len(fields) < 3:
        raise file_error(path, number, f"expected 3 tab-separated fields (image path, detection "
                                       f"score, caption), found {len(fields)}")
    image_path, score = fields[0].strip(), fields[1].strip()
    if not image_path:
        raise file_error(path, number, "empty image path")
    try:
        float(score)
    except ValueError:
        raise file_error(path, number, f"detection score {score!r} is not a number") from None
    return LabeledImage(image_path, post_process(fields[2]))


def different_words(source: str, target: str) -> tuple[str, str] | None:
    """(first source word not in target, first target word not in source), or None when either
    caption has no such word."""
    source_words, target_words = source.split(), target.split()
    source_word = next((w for w in source_words if w not in target_words), None)
    target_word = next((w for w in target_words if w not in source_words), None)
    if source_word is None or target_word is None:
        return None
    return source_word, target_word


def replace_text(source_word: str, target_word: str) -> str:
    return f"replace {source_word} with {target_word}"


def query_modifier(source: str, target: str) -> str:
    """The test-query modifier, with the original's fallback to each caption's last word so that
    every published test query is kept (its count is part of the protocol)."""
    found = different_words(source, target)
    if found is not None:
        return replace_text(*found)
    source_words, target_words = source.split(), target.split()
    return replace_text(source_words[-1] if source_words else "", target_words[-1] if target_words else "")


def parents(caption: str) -> list[str]:
    """The captions one word token shorter than `caption`, without repeats, in word order."""
    words = caption.split()
    return list(dict.fromkeys(" ".join(words[:i] + words[i + 1:]) for i in range(len(words))))


class SiblingIndex:
    """Parent captions with at least two children, and the images of every caption."""

    def __init__(self, images: list[LabeledImage]) -> None:
        self.images_of: dict[str, list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            self.images_of[image.caption].append(i)
        children: dict[str, list[str]] = defaultdict(list)
        for caption in self.images_of:
            for parent in parents(caption):
                children[parent].append(caption)
        self.children = {p: c for p, c in children.items() if len(c) >= 2}
        self.parents_of = {c: [p for p in parents(c) if p in self.children] for c in self.images_of}

    def modifiable(self, caption: str) -> bool:
        return bool(self.parents_of[caption])


def draw_target_captions(index: SiblingIndex, caption: str, count: int, rng: random.Random) -> list[str]:
    """Up to `count` distinct sibling captions of `caption` that differ from it by a word.

    Drawn as the original sampler did (random parent, then random child); the attempt budget
    bounds the loop for captions with few usable siblings.
    """
    chosen: list[str] = []
    parent_list = index.parents_of[caption]
    for _ in range(20 * count):
        if len(chosen) == count:
            break
        child = rng.choice(index.children[rng.choice(parent_list)])
        if child != caption and child not in chosen and different_words(caption, child) is not None:
            chosen.append(child)
    return chosen


def plan_train(src: Path, images: list[LabeledImage], targets_per_reference: int,
               seed: int) -> tuple[list[PlannedTriplet], dict]:
    index = SiblingIndex(images)
    rng = random.Random(seed)
    triplets = []
    references = 0
    for reference in images:
        if not index.modifiable(reference.caption):
            continue
        references += 1
        for target_caption in draw_target_captions(index, reference.caption, targets_per_reference, rng):
            target = images[rng.choice(index.images_of[target_caption])]
            source_word, target_word = different_words(reference.caption, target_caption)
            meta = TripletMeta(reference_id=reference.path, target_id=target.path,
                               modifier=replace_text(source_word, target_word),
                               complete=target_caption, target_label=target_caption)
            triplets.append(PlannedTriplet(src / reference.path, src / target.path, meta))
    stats = {"train_images": len(images), "unique_train_captions": len(index.images_of),
             "modifiable_train_images": references}
    return triplets, stats


def plan_test(src: Path, images: list[LabeledImage]) -> tuple[list[PlannedQuery], list[PlannedImage]]:
    by_path = {}
    for image in images:
        by_path.setdefault(image.path, image)
    gallery = [PlannedImage(src / im.path,
                            GalleryMeta(image_id=im.path, label=im.caption, caption=im.caption))
               for im in by_path.values()]
    queries_file = src / "test_queries.txt"
    queries = []
    for number, line in text_lines(queries_file, "Fashion200k test queries"):
        fields = line.split()
        if len(fields) != 2:
            raise file_error(queries_file, number, f"expected 2 whitespace-separated image paths "
                                                   f"(source, target), found {len(fields)} fields")
        source, target = (_test_image(by_path, queries_file, number, p) for p in fields)
        meta = QueryMeta(query_id=f"q{len(queries)}", reference_id=source.path,
                         modifier=query_modifier(source.caption, target.caption),
                         complete=target.caption, target_label=target.caption, target_id=target.path)
        queries.append(PlannedQuery(src / source.path, meta))
    return queries, gallery


def _test_image(by_path: dict[str, LabeledImage], path: Path, number: int, image_path: str) -> LabeledImage:
    if image_path not in by_path:
        raise file_error(path, number, f"image {image_path} is not in the test label files")
    return by_path[image_path]


@register_converter(NAME)
def convert(src: Path, out_url: str, *, shard_size: int = 1000, targets_per_reference: int = 2,
            seed: int = 0) -> dict:
    """Fashion200k -> train triplets and test queries/gallery (caption-level hits)."""
    require_positive("targets_per_reference", targets_per_reference)
    train_images = read_labels(src, "train")
    test_images = read_labels(src, "test")
    triplets, stats = plan_train(src, train_images, targets_per_reference, seed)
    queries, gallery = plan_test(src, test_images)
    plan = {"train": {"triplets": triplets}, "test": {"queries": queries, "gallery": gallery}}
    params = {
        "converter": NAME,
        "hits": "caption",
        "hit_rule": "a gallery image answers a query when its caption equals the target caption",
        "splits": "train and test; Fashion200k has no validation split",
        "pairing": "sibling captions sharing a one-word-shorter parent; modifier 'replace A with B'",
        "complete_text": "target caption",
        "targets_per_reference": targets_per_reference,
        "seed": seed,
        "counts": plan_counts(plan),
        **stats,
    }
    return write_plan(out_url, NAME, plan, params, shard_size=shard_size)
