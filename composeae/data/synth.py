"""CSS-synth: the built-in benchmark, a procedural 2D version of TIRG's CSS dataset.

A scene is 2-5 objects on a 3x3 grid of a white square canvas (one object per cell, centred in
it, so unchanged objects stay pixel-aligned between reference and target). Objects have one of
3 shapes (square, circle, triangle with its apex up), 8 colours with TIRG's RGB values and 2
sizes (half-extent 1/16 or 1/8 of the side: 4 or 8 px at 64 px, as in TIRG). Circles are drawn
as real circles, not as TIRG's diamonds.

A query is a one-edit modification of a source scene: add an object, remove one, or change the
colour, size or shape of one, in words from several templates per kind ("add a small red circle
to the top-left", "make the blue square large", "remove the gray triangle"). An object is named
by colour and shape, plus its position when that alone is ambiguous, so every text names exactly
one target scene.

**The gallery makes the text necessary.** Each evaluation source scene carries
`queries_per_source` queries (different edits of it) and its gallery holds the source, their
targets and `distractors_per_source` further one-edit variants of the same source, all distinct.
An image-only model then finds the target at rank 1 for about 1 / (variants per source) of the
queries (1/15 with 3 + 12), instead of nearly always, as it would with independent scenes.

Splits: `train` triplets, `val` and `test` queries + gallery. A few (shape, colour) combinations,
chosen from the seed and recorded in the manifest's params, never occur in train or val (neither
in a reference, a target nor a text); every test source scene contains one. Labels are the
canonical scene (its objects sorted by cell), so identical scenes are the same target wherever
they appear: hits are label-level. Everything is a function of the seed: the same seed gives the
same bytes, hence the same shard sha256s.
"""

from __future__ import annotations

import functools
import io
import logging
import multiprocessing
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from composeae.data import schema
from composeae.data.schema import GalleryMeta, QueryMeta, TripletMeta
from composeae.data.writer import gallery_sample, query_sample, triplet_sample, write_dataset
from composeae.errors import UserError

log = logging.getLogger(__name__)

SHAPES = ("square", "circle", "triangle")
# TIRG's 2D CSS renderer colours (RGB).
COLOURS = {
    "gray": (87, 87, 87),
    "red": (244, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 205, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
COLOUR_NAMES = tuple(COLOURS)
# Half-extent of an object as a fraction of the canvas side (TIRG: 4 and 8 px at 64 px).
SIZES = {"small": 1 / 16, "large": 1 / 8}
SIZE_NAMES = tuple(SIZES)
GRID = 3
POSITIONS = ("top-left", "top-center", "top-right", "middle-left", "center", "middle-right",
             "bottom-left", "bottom-center", "bottom-right")
MIN_OBJECTS, MAX_OBJECTS = 2, 5
N_HELD_OUT = 4


@dataclass(frozen=True)
class Preset:
    train_sources: int
    val_sources: int
    test_sources: int
    queries_per_source: int = 3
    distractors_per_source: int = 12
    shard_size: int = 1000


PRESETS = {
    # Builds in seconds, several shards per split: for tests.
    "tiny": Preset(train_sources=70, val_sources=15, test_sources=15, shard_size=32),
    # ~6k triplets, 600 queries per evaluation split: trains to meaningful recall in CPU minutes.
    "small": Preset(train_sources=2000, val_sources=200, test_sources=200, shard_size=500),
    # About the size of TIRG's CSS: ~16k training triplets and ~16k test queries.
    "full": Preset(train_sources=5400, val_sources=400, test_sources=5400, shard_size=1000),
    # A catalogue-sized test gallery: 13,000 sources x 16 scenes = 208,000 gallery images (39,000
    # queries) for measuring search at scale. Train and val are `small`'s very scenes (the same
    # seed draws them first, alike), so a model trained on `small` is evaluated on unseen test
    # scenes here.
    "catalogue": Preset(train_sources=2000, val_sources=200, test_sources=13000,
                        shard_size=2000),
}


class Obj(NamedTuple):
    cell: int
    shape: str
    colour: str
    size: str


Scene = tuple  # tuple[Obj, ...] sorted by cell: the canonical form


class Variant(NamedTuple):
    """A one-edit modification of a source scene."""
    modifier: str
    scene: Scene


@dataclass(frozen=True)
class Group:
    """A source scene and its distinct one-edit variants: the first ones are queries/triplets."""
    source: Scene
    variants: tuple[Variant, ...]


def label(scene: Scene) -> str:
    """Canonical scene label: identical scenes, identical labels (the hit rule)."""
    return ";".join(f"{o.cell}-{o.size}-{o.colour}-{o.shape}" for o in scene)


def describe(scene: Scene) -> str:
    """The whole scene in words: the "complete text" of a target and a gallery caption."""
    parts = [f"a {o.size} {o.colour} {o.shape} in the {POSITIONS[o.cell]}" for o in scene]
    return "a scene with " + ", ".join(parts[:-1]) + " and " + parts[-1]


def held_out_combinations(seed: int) -> tuple[tuple[str, str], ...]:
    """(shape, colour) pairs absent from train and val: distinct colours, every shape keeps 6+."""
    colours = np.random.default_rng([seed, 1_000]).permutation(len(COLOUR_NAMES))
    return tuple((SHAPES[i % len(SHAPES)], COLOUR_NAMES[colours[i]]) for i in range(N_HELD_OUT))


# --- edits -------------------------------------------------------------------------------------

def _refer(obj: Obj, scene: Scene) -> str:
    """Name `obj` unambiguously: by colour and shape, plus its position when those repeat."""
    twins = sum(1 for o in scene if (o.colour, o.shape) == (obj.colour, obj.shape))
    name = f"the {obj.colour} {obj.shape}"
    return name if twins == 1 else f"{name} in the {POSITIONS[obj.cell]}"


_ADD = ("add a {size} {colour} {shape} to the {pos}", "put a {size} {colour} {shape} in the {pos}",
        "place a {size} {colour} {shape} at the {pos}")
_REMOVE = ("remove {ref}", "take away {ref}", "delete {ref}")
_COLOUR = ("make {ref} {new}", "change the color of {ref} to {new}", "paint {ref} {new}")
_SIZE = ("make {ref} {new}", "change {ref} to a {new} one", "resize {ref} to {new}")
_SHAPE = ("turn {ref} into a {new}", "replace {ref} with a {size} {colour} {new}",
          "make {ref} a {new}")


def _with(scene: Scene, drop: Obj | None = None, add: Obj | None = None) -> Scene:
    objects = [o for o in scene if o != drop] + ([add] if add else [])
    return tuple(sorted(objects))


def _random_object(rng: np.random.Generator, cell: int) -> Obj:
    return Obj(cell, SHAPES[rng.integers(len(SHAPES))], COLOUR_NAMES[rng.integers(len(COLOURS))],
               SIZE_NAMES[rng.integers(len(SIZES))])


def _random_edit(rng: np.random.Generator, scene: Scene) -> Variant:
    """One random edit of `scene` (objects stay within MIN_OBJECTS..MAX_OBJECTS)."""
    kinds = ["colour", "size", "shape"]
    if len(scene) < MAX_OBJECTS:
        kinds.append("add")
    if len(scene) > MIN_OBJECTS:
        kinds.append("remove")
    kind = kinds[rng.integers(len(kinds))]
    if kind == "add":
        free = [c for c in range(GRID * GRID) if all(o.cell != c for o in scene)]
        new = _random_object(rng, free[rng.integers(len(free))])
        text = _ADD[rng.integers(len(_ADD))].format(
            size=new.size, colour=new.colour, shape=new.shape, pos=POSITIONS[new.cell])
        return Variant(text, _with(scene, add=new))
    obj = scene[rng.integers(len(scene))]
    ref = _refer(obj, scene)
    if kind == "remove":
        return Variant(_REMOVE[rng.integers(len(_REMOVE))].format(ref=ref), _with(scene, drop=obj))
    if kind == "colour":
        new_colour = _other(rng, COLOUR_NAMES, obj.colour)
        text = _COLOUR[rng.integers(len(_COLOUR))].format(ref=ref, new=new_colour)
        return Variant(text, _with(scene, obj, obj._replace(colour=new_colour)))
    if kind == "size":
        new_size = _other(rng, SIZE_NAMES, obj.size)
        text = _SIZE[rng.integers(len(_SIZE))].format(ref=ref, new=new_size)
        return Variant(text, _with(scene, obj, obj._replace(size=new_size)))
    new_shape = _other(rng, SHAPES, obj.shape)
    text = _SHAPE[rng.integers(len(_SHAPE))].format(
        ref=ref, new=new_shape, size=obj.size, colour=obj.colour)
    return Variant(text, _with(scene, obj, obj._replace(shape=new_shape)))


def _other(rng: np.random.Generator, options: tuple[str, ...], current: str) -> str:
    rest = [o for o in options if o != current]
    return rest[rng.integers(len(rest))]


# --- planning ----------------------------------------------------------------------------------

def _random_scene(rng: np.random.Generator, allowed: Callable[[Obj], bool],
                  forced: tuple[str, str] | None) -> Scene:
    """2-5 allowed objects in distinct cells; `forced` (shape, colour) is placed first if given."""
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    cells = [int(c) for c in rng.choice(GRID * GRID, size=n, replace=False)]
    objects = []
    if forced:
        shape, colour = forced
        objects.append(Obj(cells.pop(), shape, colour, SIZE_NAMES[rng.integers(len(SIZES))]))
    for cell in cells:
        obj = _random_object(rng, cell)
        while not allowed(obj):
            obj = _random_object(rng, cell)
        objects.append(obj)
    return tuple(sorted(objects))


def _group(rng: np.random.Generator, source: Scene, n_variants: int,
           allowed: Callable[[Obj], bool]) -> Group | None:
    """`n_variants` distinct allowed edits of `source`, or None if it has too few."""
    seen = {label(source)}
    variants: list[Variant] = []
    for _ in range(50 * n_variants):
        variant = _random_edit(rng, source)
        key = label(variant.scene)
        if key in seen or not all(allowed(o) for o in variant.scene):
            continue
        seen.add(key)
        variants.append(variant)
        if len(variants) == n_variants:
            return Group(source, tuple(variants))
    return None


def plan(preset: str = "small", seed: int = 0) -> dict[str, list[Group]]:
    """The scenes and texts of every split (no pixels): {split: [Group, ...]}.

    Train groups carry `queries_per_source` variants (the triplets); val and test groups carry
    the queries' variants first, then the distractors. Source scenes are distinct across splits.
    """
    p = _preset(preset)
    held = set(held_out_combinations(seed))

    def in_distribution(o: Obj) -> bool:
        return (o.shape, o.colour) not in held

    def anything(o: Obj) -> bool:
        return True

    eval_variants = p.queries_per_source + p.distractors_per_source
    specs = [  # split, sources, variants per source, object rule, forced novel object
        (schema.TRAIN_SPLIT, p.train_sources, p.queries_per_source, in_distribution, False),
        ("val", p.val_sources, eval_variants, in_distribution, False),
        ("test", p.test_sources, eval_variants, anything, True),
    ]
    used_sources: set[str] = set()
    plans: dict[str, list[Group]] = {}
    for index, (split, n_sources, n_variants, allowed, novel) in enumerate(specs):
        rng = np.random.default_rng([seed, index])
        held_list = sorted(held)
        groups: list[Group] = []
        while len(groups) < n_sources:
            forced = held_list[rng.integers(len(held_list))] if novel else None
            source = _random_scene(rng, allowed, forced)
            if label(source) in used_sources:
                continue
            group = _group(rng, source, n_variants, allowed)
            if group is not None:
                used_sources.add(label(source))
                groups.append(group)
        plans[split] = groups
    return plans


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown CSS-synth preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


# --- rendering and samples ---------------------------------------------------------------------

def render(scene: Scene, image_size: int = 64) -> bytes:
    """PNG bytes of `scene` on a white `image_size` square (no antialiasing: exact, repeatable)."""
    image = Image.new("RGB", (image_size, image_size), "white")
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID
    for o in scene:
        row, col = divmod(o.cell, GRID)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        h = SIZES[o.size] * image_size
        fill = COLOURS[o.colour]
        if o.shape == "square":
            draw.rectangle((cx - h, cy - h, cx + h - 1, cy + h - 1), fill=fill)
        elif o.shape == "circle":
            draw.ellipse((cx - h, cy - h, cx + h - 1, cy + h - 1), fill=fill)
        else:
            draw.polygon(((cx, cy - h), (cx - h, cy + h - 1), (cx + h - 1, cy + h - 1)), fill=fill)
    buffer = io.BytesIO()
    # Fixed encoder settings and no metadata chunks: the bytes depend on the pixels only.
    image.save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


Draw = Callable[[Scene], bytes]
"""A scene's PNG bytes at the dataset's image size (`render`, or a lookup of pre-rendered ones)."""


def renderer(groups: Iterable[Group], image_size: int, workers: int = 1) -> Draw:
    """The `Draw` of the sample generators. With one worker it renders on demand; with more,
    every distinct scene of `groups` is rendered once, up front, by a pool of processes (PNG
    encoding is the cost of a build: about 5,600 scenes/s per core at 64 px) and looked up.
    The bytes are the same either way, so the shards and their sha256s are too."""
    if workers <= 1:
        return functools.partial(render, image_size=image_size)
    scenes = list(dict.fromkeys(scene for group in groups
                                for scene in (group.source, *(v.scene for v in group.variants))))
    # fork: the workers need only `render`, and fork starts them without re-importing anything.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        images = pool.map(functools.partial(render, image_size=image_size), scenes,
                          chunksize=max(1, len(scenes) // (8 * workers)))
    return dict(zip(scenes, images)).__getitem__


def _image_id(split: str, group: int, variant: int) -> str:
    """v00 is the source scene, v01.. its variants in plan order."""
    return f"{split}-s{group:05d}-v{variant:02d}"


def train_samples(groups: list[Group], image_size: int,
                  id_prefix: str = schema.TRAIN_SPLIT, draw: Draw | None = None) -> Iterator[dict]:
    """The training samples of `groups`; image ids start with `id_prefix` (a day's slice uses
    its own, so appended ids never collide with the original ones)."""
    draw = draw or renderer(groups, image_size)
    for g, group in enumerate(groups):
        reference = draw(group.source)
        for v, variant in enumerate(group.variants, start=1):
            meta = TripletMeta(
                reference_id=_image_id(id_prefix, g, 0), target_id=_image_id(id_prefix, g, v),
                modifier=variant.modifier, complete=describe(variant.scene),
                target_label=label(variant.scene))
            yield triplet_sample(meta.target_id, reference, "png", draw(variant.scene), "png",
                                 meta)


def _queries(split: str, groups: list[Group], per_source: int, draw: Draw) -> Iterator[dict]:
    for g, group in enumerate(groups):
        reference = draw(group.source)
        for v, variant in enumerate(group.variants[:per_source], start=1):
            meta = QueryMeta(
                query_id=f"{split}-q{g * per_source + v - 1:06d}",
                reference_id=_image_id(split, g, 0), modifier=variant.modifier,
                complete=describe(variant.scene), target_label=label(variant.scene),
                target_id=_image_id(split, g, v))
            yield query_sample(meta.query_id, reference, "png", meta)


def _gallery(split: str, groups: list[Group], draw: Draw) -> Iterator[dict]:
    for g, group in enumerate(groups):
        for v, scene in enumerate([group.source] + [var.scene for var in group.variants]):
            meta = GalleryMeta(image_id=_image_id(split, g, v), label=label(scene),
                               caption=describe(scene))
            yield gallery_sample(meta.image_id, draw(scene), "png", meta)


def generate(out_url: str, preset: str = "small", seed: int = 0, image_size: int = 64,
             workers: int = 1) -> dict:
    """Build CSS-synth shards at `out_url` (local directory or s3://); returns the manifest.
    `workers` processes render the images (the result does not depend on how many)."""
    p = _preset(preset)
    if not 32 <= image_size <= 1024:
        raise UserError(f"CSS-synth image size must be between 32 and 1024 px, got {image_size}")
    if seed < 0:
        raise UserError(f"CSS-synth seed must be >= 0, got {seed}")
    if workers < 1:
        raise UserError(f"CSS-synth needs at least one worker, got {workers}")
    plans = plan(preset, seed)
    draw = renderer([g for groups in plans.values() for g in groups], image_size, workers)
    splits = {schema.TRAIN_SPLIT: {
        schema.TRIPLETS: train_samples(plans[schema.TRAIN_SPLIT], image_size, draw=draw)}}
    for split in schema.EVAL_SPLITS:
        splits[split] = {
            schema.QUERIES: _queries(split, plans[split], p.queries_per_source, draw),
            schema.GALLERY: _gallery(split, plans[split], draw),
        }
    params = {
        "generator": "css-synth",
        "preset": preset,
        "seed": seed,
        "image_size": image_size,
        "queries_per_source": p.queries_per_source,
        "distractors_per_source": p.distractors_per_source,
        "held_out": [f"{colour} {shape}" for shape, colour in held_out_combinations(seed)],
        "hit": "label",
        schema.EXCLUDE_REFERENCE: True,
    }
    log.info("generating CSS-synth %s (seed %d) at %s", preset, seed, out_url)
    return write_dataset(out_url, f"css-synth-{preset}", splits, params, shard_size=p.shard_size)


def day_plan(preset: str, seed: int, day: str, sources: int) -> list[Group]:
    """A day's new training groups (the nightly stand-in for a day's new catalogue): seeded by
    (seed, day), in distribution like the training split, and no source scene of any original
    split, so no evaluation scene ever enters training."""
    p = _preset(preset)
    held = set(held_out_combinations(seed))

    def in_distribution(o: Obj) -> bool:
        return (o.shape, o.colour) not in held

    used = {label(g.source) for groups in plan(preset, seed).values() for g in groups}
    year, month, dom = (int(x) for x in day.split("-"))
    rng = np.random.default_rng([seed, 2_000, year, month, dom])
    groups: list[Group] = []
    while len(groups) < sources:
        source = _random_scene(rng, in_distribution, None)
        if label(source) in used:
            continue
        group = _group(rng, source, p.queries_per_source, in_distribution)
        if group is not None:
            used.add(label(source))
            groups.append(group)
    return groups
