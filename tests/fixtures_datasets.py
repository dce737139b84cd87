"""Tiny copies of the five published datasets, in their exact on-disk layouts, for converter tests.

Each builder writes a handful of 8x8 images (real JPEG/PNG files made with PIL) and real
annotation files into a directory and returns it. The contents are chosen so that the pairing and
hit rules have something to get wrong: sibling captions, a caption pair with no differing word,
test nouns, a missing FashionIQ image, a CIRR reference in the gallery, identical CSS scenes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

_PALETTE = [(200, 30, 30), (30, 60, 200), (20, 180, 40), (240, 220, 40), (120, 70, 20), (40, 200, 200)]


def save_image(path: Path, seed: int, fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), _PALETTE[seed % len(_PALETTE)]).save(path, format=fmt)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# --- Fashion200k -------------------------------------------------------------------------------

F200K_TRAIN = {
    # "floral dress" has three children and "red dress" two: the red floral dress reaches both
    # groups, so its target changes from pass to pass; blue floral dress has two images.
    "dress": [
        ("women/dresses/casual/1/1_0.jpeg", "red floral dress"),
        ("women/dresses/casual/2/2_0.jpeg", "blue floral dress"),
        ("women/dresses/casual/2/2_1.jpeg", "blue floral dress"),
        ("women/dresses/casual/8/8_0.jpeg", "green floral dress"),
        ("women/dresses/casual/9/9_0.jpeg", "red striped dress"),
        ("women/dresses/casual/3/3_0.jpeg", "long gown. v-neck"),  # no sibling; has a '.'
    ],
    "jacket": [
        ("women/jackets/leather/4/4_0.jpeg", "black leather jacket"),
        ("women/jackets/leather/5/5_0.jpeg", "brown leather jacket"),
    ],
    "pants": [],
    "skirt": [],
    # Siblings through the parent "cotton top", but with the same words: no "replace A with B".
    "top": [
        ("women/tops/basic/6/6_0.jpeg", "white cotton top"),
        ("women/tops/basic/7/7_0.jpeg", "cotton white top"),
    ],
}
F200K_TEST = {
    "dress": [
        ("women/dresses/t/10/10_0.jpeg", "red maxi dress"),
        ("women/dresses/t/11/11_0.jpeg", "blue maxi dress"),
        ("women/dresses/t/12/12_0.jpeg", "blue maxi dress"),
    ],
    "jacket": [("women/jackets/t/13/13_0.jpeg", "green wool coat")],
    "pants": [], "skirt": [], "top": [],
}
F200K_QUERIES = [("women/dresses/t/10/10_0.jpeg", "women/dresses/t/11/11_0.jpeg"),
                 ("women/dresses/t/11/11_0.jpeg", "women/jackets/t/13/13_0.jpeg"),
                 # Same caption on both sides: the original fell back to the last words.
                 ("women/dresses/t/12/12_0.jpeg", "women/dresses/t/11/11_0.jpeg")]
# Not a JPEG despite its name: the converter must store it as a real JPEG or PNG.
F200K_BMP_IMAGE = "women/dresses/t/12/12_0.jpeg"


def make_fashion200k(root: Path, train: dict = F200K_TRAIN) -> Path:
    seed = 0
    for split, table in (("train", train), ("test", F200K_TEST)):
        for category, images in table.items():
            write_lines(root / "labels" / f"{category}_{split}_detect_all.txt",
                        [f"{path}\t0.{seed + i + 1}\t{caption}" for i, (path, caption) in enumerate(images)])
            for path, _ in images:
                seed += 1
                save_image(root / path, seed, "BMP" if path == F200K_BMP_IMAGE else "JPEG")
    write_lines(root / "test_queries.txt", [f"{s} {t}" for s, t in F200K_QUERIES])
    return root


# --- MIT-States --------------------------------------------------------------------------------

MIT_DIRS = {
    "red apple": ["apple_1.jpg", "apple_2.jpg"],
    "green apple": ["apple_3.jpg"],
    "rotten apple": ["apple_4.jpg"],
    "adj apple": ["apple_5.jpg"],        # the bare noun: not used
    "misc": ["other.jpg"],               # no adjective: not used
    "old fish": ["fish_1.jpg"],          # fish and glass are test nouns
    "fresh fish": ["fish_2.jpg", "fish_3.jpg"],
    "broken glass": ["glass_1.jpg"],
    "shiny glass": ["glass_2.jpg"],
}


# Eight training nouns of three adjectives and two images each, plus the test nouns of MIT_DIRS:
# enough groups for a batch to mix.
MIT_MANY_NOUNS = {
    **{f"{adj} {noun}": [f"{noun}_{adj}_1.jpg", f"{noun}_{adj}_2.jpg"]
       for noun in ("apple", "bread", "car", "dog", "egg", "hat", "key", "lamp")
       for adj in ("old", "new", "wet")},
    **{folder: files for folder, files in MIT_DIRS.items() if folder.split()[-1] in ("fish", "glass")},
}


def make_mitstates(root: Path, dirs: dict = MIT_DIRS) -> Path:
    for n, (folder, files) in enumerate(dirs.items()):
        for k, name in enumerate(files):
            save_image(root / "images" / folder / name, n + k)
    return root


# --- FashionIQ ---------------------------------------------------------------------------------

FIQ_ON_DISK = {"d1": "jpg", "d2": "jpg", "d3": "jpg", "s1": "jpg", "s2": "jpg", "s3": "png",
               "t1": "jpg", "t2": "jpg", "t3": "jpg"}   # d4 and t9 are referenced but missing
FIQ_CAPTIONS = {
    ("dress", "train"): [
        {"candidate": "d1", "target": "d2", "captions": ["Is red.", "has short sleeves"]},
        {"candidate": "d1", "target": "d4", "captions": ["is longer", "is blue"]},
    ],
    ("shirt", "train"): [{"candidate": "s1", "target": "s2", "captions": ["has a collar", "is plain?"]}],
    ("toptee", "train"): [{"candidate": "t1", "target": "t2", "captions": ["is black", "has text"]}],
    ("dress", "val"): [{"candidate": "d3", "target": "d1", "captions": ["is shorter", "is red"]}],
    ("shirt", "val"): [{"candidate": "s1", "target": "s3", "captions": ["is striped", "has buttons"]}],
    ("toptee", "val"): [
        {"candidate": "t3", "target": "t2", "captions": ["is darker", "has no print"]},
        {"candidate": "t1", "target": "t9", "captions": ["is white", "is plain"]},
    ],
    ("dress", "test"): [{"candidate": "d2", "captions": ["is green", "is long"]}],
    ("shirt", "test"): [{"candidate": "s2", "captions": ["is blue", "is short"]}],
    ("toptee", "test"): [{"candidate": "t2", "captions": ["is red", "is loose"]}],
}
FIQ_SPLITS = {
    ("dress", "train"): ["d1", "d2", "d4"], ("shirt", "train"): ["s1", "s2"],
    ("toptee", "train"): ["t1", "t2"],
    # d1 is in the shirt gallery as well: galleries are per category, so it appears in both.
    ("dress", "val"): ["d1", "d2", "d3"], ("shirt", "val"): ["s1", "s2", "s3", "d1"],
    ("toptee", "val"): ["t1", "t2", "t3"],
    ("dress", "test"): ["d2"], ("shirt", "test"): ["s2"], ("toptee", "test"): ["t2"],
}


def make_fashioniq(root: Path, on_disk: dict = FIQ_ON_DISK, captions: dict = FIQ_CAPTIONS,
                   splits: dict = FIQ_SPLITS) -> Path:
    for n, (asin, ext) in enumerate(on_disk.items()):
        save_image(root / "images" / f"{asin}.{ext}", n, "PNG" if ext == "png" else "JPEG")
    for (category, split), entries in captions.items():
        write_json(root / "captions" / f"cap.{category}.{split}.json", entries)
    for (category, split), asins in splits.items():
        write_json(root / "image_splits" / f"split.{category}.{split}.json", asins)
    return root


def fashioniq_layout(train_per_category: int, val: dict[str, list[tuple[str, str]]]
                     ) -> tuple[dict, dict, dict]:
    """(on_disk, captions, splits) for `make_fashioniq`: `train_per_category` training triplets
    per category (between two images of that category) and the given val (candidate, target)
    pairs, whose images make up each category's val gallery."""
    on_disk, captions, splits = {}, {}, {}
    for category in ("dress", "shirt", "toptee"):
        a, b = f"{category}-a", f"{category}-b"
        on_disk |= {a: "jpg", b: "jpg"}
        captions[category, "train"] = [
            {"candidate": a, "target": b, "captions": [f"is {category} {i}", "is nice"]}
            for i in range(train_per_category)]
        splits[category, "train"] = [a, b]
        pairs = val.get(category, [])
        captions[category, "val"] = [{"candidate": c, "target": t, "captions": ["is other", "ok"]}
                                     for c, t in pairs]
        gallery = list(dict.fromkeys(asin for pair in pairs for asin in pair)) or [a]
        on_disk |= {asin: "jpg" for asin in gallery}
        splits[category, "val"] = gallery
        captions[category, "test"] = []
        splits[category, "test"] = []
    return on_disk, captions, splits


# --- CIRR --------------------------------------------------------------------------------------

CIRR_SPLITS = {
    "train": {"train-1-0-img0": "./train/0/train-1-0-img0.png",
              "train-1-0-img1": "./train/0/train-1-0-img1.png",
              "train-2-1-img0": "./train/1/train-2-1-img0.png"},
    "val": {"dev-1-0-img0": "./dev/dev-1-0-img0.png", "dev-1-0-img1": "./dev/dev-1-0-img1.png",
            "dev-2-1-img0": "./dev/dev-2-1-img0.png", "dev-3-0-img1": "./dev/dev-3-0-img1.png"},
    "test1": {"test1-1-0-img0": "./test1/test1-1-0-img0.png",
              "test1-2-0-img1": "./test1/test1-2-0-img1.png"},
}
CIRR_PAIRS = {
    "train": [(0, "train-1-0-img0", "train-1-0-img1", "add a dog"),
              (1, "train-2-1-img0", "train-1-0-img0", "make it night")],
    "val": [(100, "dev-1-0-img0", "dev-2-1-img0", "remove the people"),
            (101, "dev-3-0-img1", "dev-1-0-img1", "zoom in on the car")],
    "test1": [(200, "test1-1-0-img0", None, "show it from above")],
}


def _cirr_entry(pairid: int, reference: str, target: str | None, caption: str, members: list[str]) -> dict:
    entry = {"pairid": pairid, "reference": reference, "caption": caption,
             "img_set": {"id": pairid, "members": members, "reference_rank": 0, "target_rank": 1}}
    if target is not None:
        entry.update(target_hard=target, target_soft={target: 1.0})
    return entry


def make_cirr(root: Path, images_under: str = "") -> Path:
    """CIRR with its images under the dataset root (images_under="") or e.g. "cirr/img_raw"."""
    n = 0
    for split, names in CIRR_SPLITS.items():
        write_json(root / "cirr" / "image_splits" / f"split.rc2.{split}.json", names)
        for rel in names.values():
            n += 1
            save_image(root / images_under / rel, n, "PNG")
        members = list(names)
        write_json(root / "cirr" / "captions" / f"cap.rc2.{split}.json",
                   [_cirr_entry(*pair, members) for pair in CIRR_PAIRS[split]])
    return root


# --- CSS3D -------------------------------------------------------------------------------------

def _obj(shape: str, color: str, size: str, y: float, x: float) -> dict:
    return {"shape": shape, "color": color, "size": size, "pos": (y, x)}


CUBE = _obj("cube", "red", "large", 0.25, 0.25)
BALL = _obj("sphere", "blue", "small", 0.75, 0.5)
CONE = _obj("cylinder", "green", "large", 0.5, 0.75)
CSS_DATA = {
    "train": {
        "objects_img": [[CUBE], [CUBE, BALL], [BALL], [CONE, BALL]],
        "mods": [{"from": [0, 2], "to": [1, 1], "to_str": "add blue sphere"},
                 {"from": [1], "to": [2], "to_str": "remove red cube"}],
    },
    "test": {
        # Scenes 0 and 2 are the same scene (objects listed in another order): one label.
        "objects_img": [[CUBE, CONE], [CUBE], [CONE, CUBE], [BALL]],
        "mods": [{"from": [1], "to": [0], "to_str": "add green cylinder"},
                 {"from": [0, 2], "to": [1, 1], "to_str": "remove green cylinder"}],
    },
}


def make_css3d(root: Path, data: dict = CSS_DATA) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "css_toy_dataset_novel2_small.dup.npy", data, allow_pickle=True)
    for split in ("train", "test"):
        for i in range(len(data[split]["objects_img"])):
            save_image(root / "images" / f"css_{split}_{i:06d}.png", i, "PNG")
    return root
