"""CSS3D, TIRG's CLEVR-style scene dataset, in the format TIRG published.

On disk, under the dataset root:

    css_toy_dataset_novel2_small.dup.npy
        a pickled dict (Python 2, hence `encoding="latin1"`): dict[split] for split in train, test
        = {"objects_img": [scene, ...], "mods": [{"from": [ids], "to": [ids], "to_str": text}],
           optional "labels": [label per image]}; a scene is a list of {color, shape, size, pos}
    images/css_{split}_{index:06d}.png

Rules (TIRG `datasets.py:CSSDataset`):
- Training triplets: every from -> to pair of every train modification; the modifier is its
  `to_str`. CSS has no captions, so the complete text is the modifier too.
- Test queries: every from -> to pair of every test modification; the gallery is every test image.
- Hits are label-level: images showing the same scene share a label. The label is the file's
  `labels` entry when present, else a canonical form of the scene's objects (sorted, positions
  rounded), so identical scenes rendered twice still match. The query's reference is excluded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from composeae.data import schema
from composeae.data.schema import GalleryMeta, QueryMeta, TripletMeta
from composeae.data.sources.common import (PlannedImage, PlannedQuery, PlannedTriplet, file_error,
                                           plan_counts, register_converter, require_dir,
                                           require_file, write_plan)
from composeae.errors import UserError

NAME = "css3d"
DATA_FILE = "css_toy_dataset_novel2_small.dup.npy"
SPLITS = ("train", "test")
_OBJECT_FIELDS = ("shape", "color", "size", "pos")


def load(src: Path) -> dict:
    path = require_file(src / DATA_FILE, "CSS3D data file")
    try:
        data = np.load(path, allow_pickle=True, encoding="latin1").item()
    except (OSError, ValueError, EOFError, AttributeError, ImportError) as e:
        raise file_error(path, None, f"not a pickled CSS dictionary ({e})") from None
    if not isinstance(data, dict):
        raise file_error(path, None, f"expected a dict of splits, found {type(data).__name__}")
    for split in SPLITS:
        if not isinstance(data.get(split), dict):
            raise file_error(path, None, f"missing split {split!r}")
        for field in ("objects_img", "mods"):
            if field not in data[split]:
                raise file_error(path, None, f"split {split!r} has no {field!r}")
    return data


def image_id(split: str, index: int) -> str:
    return f"css_{split}_{index:06d}"


def canonical_scene(path: Path, where: str, objects: Any) -> str:
    """A label that is equal exactly for scenes with the same objects at the same positions."""
    try:
        parts = sorted(
            (obj["shape"], obj["color"], obj["size"], tuple(round(float(v), 3) for v in obj["pos"]))
            for obj in objects
        )
    except (KeyError, TypeError, ValueError) as e:
        raise file_error(path, None, f"{where}: malformed scene (each object needs "
                                     f"{', '.join(_OBJECT_FIELDS)}): {e!r}") from None
    return ";".join(f"{shape}-{color}-{size}@{','.join(map(str, pos))}" for shape, color, size, pos in parts)


def labels(path: Path, split: str, data: dict) -> list[str]:
    scenes = data["objects_img"]
    if "labels" in data:
        given = list(data["labels"])
        if len(given) != len(scenes):
            raise file_error(path, None, f"split {split!r}: {len(given)} labels for {len(scenes)} scenes")
        return [str(label) for label in given]
    return [canonical_scene(path, f"{split} objects_img[{i}]", scene) for i, scene in enumerate(scenes)]


def pairs(path: Path, split: str, data: dict) -> list[tuple[int, int, str]]:
    """(from, to, to_str) for every pair of every modification of a split."""
    count = len(data["objects_img"])
    out = []
    for m, mod in enumerate(data["mods"]):
        where = f"{split} mods[{m}]"
        try:
            sources, targets, text = list(mod["from"]), list(mod["to"]), mod["to_str"]
        except (KeyError, TypeError):
            raise file_error(path, None, f"{where}: expected 'from', 'to' and 'to_str'") from None
        if len(sources) != len(targets):
            raise file_error(path, None, f"{where}: {len(sources)} 'from' ids but {len(targets)} 'to' ids")
        for f, t in zip(sources, targets):
            out.append((_image_index(path, where, f, count), _image_index(path, where, t, count), str(text)))
    return out


def _image_index(path: Path, where: str, value: Any, count: int) -> int:
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise file_error(path, None, f"{where}: image id {value!r} is not an integer") from None
    if not 0 <= index < count:
        raise file_error(path, None, f"{where}: image id {index} out of range 0..{count - 1}")
    return index


@register_converter(NAME)
def convert(src: Path, out_url: str, *, shard_size: int = 1000, seed: int = 0) -> dict:
    """CSS3D -> train triplets and test queries/gallery (label-level hits); training triplets
    are written in an order shuffled with `seed`."""
    path = src / DATA_FILE
    data = load(src)
    images = require_dir(src / "images", "CSS3D images directory")

    def image(split: str, index: int) -> Path:
        return images / f"{image_id(split, index)}.png"

    train, test = data["train"], data["test"]
    train_labels, test_labels = labels(path, "train", train), labels(path, "test", test)
    triplets = [
        PlannedTriplet(image("train", f), image("train", t),
                       TripletMeta(reference_id=image_id("train", f), target_id=image_id("train", t),
                                   modifier=text, complete=text, target_label=train_labels[t]))
        for f, t, text in pairs(path, "train", train)
    ]
    queries = [
        PlannedQuery(image("test", f),
                     QueryMeta(query_id=f"q{n}", reference_id=image_id("test", f), modifier=text,
                               complete=text, target_label=test_labels[t], target_id=image_id("test", t)))
        for n, (f, t, text) in enumerate(pairs(path, "test", test))
    ]
    gallery = [PlannedImage(image("test", i), GalleryMeta(image_id=image_id("test", i), label=label))
               for i, label in enumerate(test_labels)]
    if not triplets or not queries:
        raise UserError(f"{path}: CSS3D needs modifications in both splits "
                        f"(train pairs: {len(triplets)}, test pairs: {len(queries)})")
    plan = {schema.TRAIN_SPLIT: {schema.TRIPLETS: triplets},
            "test": {schema.QUERIES: queries, schema.GALLERY: gallery}}
    params = {
        "converter": NAME,
        "hits": "label",
        "hit_rule": "a gallery image answers a query when it shows the same scene as the target "
                    "(same label); the reference image is excluded",
        schema.EXCLUDE_REFERENCE: True,
        "labels": "from the file's 'labels'" if "labels" in test else "canonical scene description",
        "splits": "train and test (TIRG's CSS has no validation split)",
        "complete_text": "the modifier (CSS has no captions)",
        "seed": seed,
        "counts": plan_counts(plan),
    }
    return write_plan(out_url, NAME, plan, params, shard_size=shard_size, seed=seed)
