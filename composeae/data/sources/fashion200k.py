"""Fashion200k (Han et al. 2017) in the layout and with the pairing rules TIRG introduced.

On disk, under the dataset root:

    labels/{dress,jacket,pants,skirt,top}_{train,test}_detect_all.txt
        one image per line: `women/<cat>/<sub>/<id>/<id>_<n>.jpeg<TAB><score><TAB><caption>`
    test_queries.txt     `source_path target_path` per line (the fixed test queries)
    women/...            the images, at the paths the label files give

Rules (TIRG `datasets.py:Fashion200k`, which ComposeAE reuses):
- The label files that exist are read (the original globbed `labels/*_{split}_detect_all.txt`,
  so a subset of the categories is a common use); the categories found are logged and recorded
  in the manifest. A split with no label file at all is an error.
- Captions are post-processed: `.` -> `dotmark`, `?` -> `questionmark`, `&` -> `andmark`,
  `*` -> `starmark`.
- A *parent* caption is a caption with one word removed. Two captions sharing a parent are
  siblings; an image whose caption has a sibling is modifiable. Training pairs are drawn at
  every pass by the stream (`composeae.data.pairing`, rule "fashion200k"), as the original
  sampler drew them at every step: a random parent of the reference caption, a random child of
  it other than the reference caption, a random image of that child. The train split therefore
  holds one *group* per parent caption with at least two children: the images of its children.
  An image is stored in each of its caption's groups (about two on average), since a reference
  must reach every sibling; each pass it is a reference in one of them.
- The modifier is "replace <w_src> with <w_tgt>": the first reference word missing from the target
  caption and the first target word missing from the reference caption. The complete text is the
  target caption.
- Test: the queries of test_queries.txt; the gallery is every test image. Hits are caption-level:
  a gallery image answers a query when its caption equals the target caption (the reported
  protocol), and the query's own reference image is excluded.

Deliberate differences from the original, each noted where it happens: parents remove one word
*token* (the original removed every substring occurrence of the word, which mangles captions
where the word occurs inside another word), and sibling captions with no differing word are not
paired (the original then fell back to the captions' last words).

Fashion200k has no validation split, so the shards hold only "train" and "test".
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from composeae.data import schema
from composeae.data.pairing import PAIRS_PER_REFERENCE, different_words, replace_text
from composeae.data.schema import GalleryMeta, GroupMeta, QueryMeta
from composeae.data.sources.common import (PlannedGroup, PlannedImage, PlannedQuery, file_error,
                                           plan_counts, register_converter, require_dir,
                                           text_lines, write_plan)
from composeae.errors import UserError

log = logging.getLogger("composeae.data.sources")

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


def read_labels(src: Path, split: str) -> tuple[list[LabeledImage], list[str]]:
    """Every image of a split, in category order and then file order, and the categories whose
    label file exists; `UserError` when none does."""
    require_dir(src / "labels", "Fashion200k labels directory")
    images, found = [], []
    for category in CATEGORIES:
        path = label_file(src, category, split)
        if not path.is_file():
            continue
        found.append(category)
        for number, line in text_lines(path, f"Fashion200k {split} label file"):
            images.append(_parse_label_line(path, number, line))
    if not found:
        raise UserError(f"no Fashion200k {split} label file in {src / 'labels'}: expected "
                        f"<category>_{split}_detect_all.txt for some of {', '.join(CATEGORIES)}")
    return images, found


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
    """Parent captions with at least two children, the images of every caption, and for each
    caption the parents under which it has a sibling one word away (its *usable* parents)."""

    def __init__(self, images: list[LabeledImage]) -> None:
        self.images_of: dict[str, list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            self.images_of[image.caption].append(i)
        children: dict[str, list[str]] = defaultdict(list)
        for caption in self.images_of:
            for parent in parents(caption):
                children[parent].append(caption)
        self.children = {p: sorted(c) for p, c in children.items() if len(c) >= 2}
        self.usable: dict[str, list[str]] = {
            c: [p for p in parents(c) if p in self.children and self._has_sibling(c, p)]
            for c in self.images_of}

    def _has_sibling(self, caption: str, parent: str) -> bool:
        return any(other != caption and different_words(caption, other) is not None
                   for other in self.children[parent])

    def modifiable(self, caption: str) -> bool:
        return bool(self.usable[caption])


def plan_train(src: Path, images: list[LabeledImage]) -> tuple[list[PlannedGroup], dict]:
    """One group per parent caption that gives some caption a pair (see the module docstring)."""
    index = SiblingIndex(images)
    groups = []
    for parent, children in sorted(index.children.items()):
        slots = [(index.usable[c].index(parent), len(index.usable[c]))
                 if parent in index.usable[c] else (-1, 0) for c in children]
        if all(slot < 0 for slot, _ in slots):
            continue  # nobody's pair is drawn here: its images are reached through other groups
        members = [(i, c) for c, caption in enumerate(children) for i in index.images_of[caption]]
        texts = list(children)
        for caption, (slot, _) in zip(children, slots):
            sibling = next((o for o in children if o != caption
                            and slot >= 0 and different_words(caption, o) is not None), None)
            if sibling is not None:
                texts.append(replace_text(*different_words(caption, sibling)))
        meta = GroupMeta(key=parent, rule=NAME,
                         image_ids=tuple(images[i].path for i, _ in members),
                         captions=tuple(children), caption_of=tuple(c for _, c in members),
                         slots=tuple(slots), texts=tuple(texts))
        groups.append(PlannedGroup(tuple(src / images[i].path for i, _ in members), meta))
    references = sum(len(index.images_of[c]) for c in index.images_of if index.modifiable(c))
    stats = {"train_images": len(images), "unique_train_captions": len(index.images_of),
             "modifiable_train_images": references,
             "stored_train_images": sum(len(g.images) for g in groups)}
    return groups, stats


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
def convert(src: Path, out_url: str, *, shard_size: int = 100, seed: int = 0) -> dict:
    """Fashion200k -> train pairing groups and test queries/gallery (caption-level hits).

    A train shard holds `shard_size` groups (of a few to a few thousand images each)."""
    train_images, train_categories = read_labels(src, "train")
    test_images, test_categories = read_labels(src, "test")
    log.info("%s: train categories %s; test categories %s", NAME, ", ".join(train_categories),
             ", ".join(test_categories))
    groups, stats = plan_train(src, train_images)
    if not groups:
        raise UserError(f"Fashion200k under {src}: no training caption has a sibling one word "
                        f"away, so there is nothing to train on")
    queries, gallery = plan_test(src, test_images)
    plan = {schema.TRAIN_SPLIT: {schema.GROUPS: groups},
            "test": {schema.QUERIES: queries, schema.GALLERY: gallery}}
    references = stats["modifiable_train_images"]
    params = {
        "converter": NAME,
        "hits": "caption",
        "hit_rule": "a gallery image answers a query when its caption equals the target caption",
        schema.EXCLUDE_REFERENCE: True,
        "splits": "train and test; Fashion200k has no validation split",
        "categories": {"train": train_categories, "test": test_categories},
        "pairing_rule": "a sibling caption one word away (sharing a one-word-shorter parent), "
                        "drawn at every pass; modifier 'replace A with B'",
        schema.PAIRING: {"rule": NAME, "references": references,
                         "pairs_per_epoch": references * PAIRS_PER_REFERENCE[NAME]},
        "complete_text": "target caption",
        "seed": seed,
        "counts": plan_counts(plan),
        **stats,
    }
    return write_plan(out_url, NAME, plan, params, shard_size=shard_size, seed=seed)
