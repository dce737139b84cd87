"""Training pairs drawn at every pass from pairing groups, by each dataset's original rule.

What belongs here: the pairing rules (pure functions of a group's metadata and a random source)
and the word-level helpers they share with the converters. The converters build the groups
(`schema.GroupMeta`); the stream (`composeae.data.stream`) opens them and calls `group_units`.

The original TIRG/ComposeAE samplers drew a new target for a reference at every step. Reading
images in random order from object storage is not possible, so a group holds every image a
reference may be paired with, and every pass over a group draws its references' targets afresh:

- "fashion200k": a group is a parent caption (a caption with one word removed) and the images of
  its child captions. A reference image of caption c draws one of c's parent captions uniformly
  (its groups share the draw: it is a reference in exactly one of them per pass), then a child
  caption of that parent other than c and differing from c by a word, then an image of it. The
  modifier is "replace <w_src> with <w_tgt>", the complete text the target caption.
- "mitstates": a group is a noun and its images. A reference draws two different other
  adjectives of its noun (one twice when the noun has just one other) and an image of each; the
  two pairs travel as one unit and land in the same batch, as in the original, which returned a
  source's second pair as the next sample of the same batch. The modifier is the target
  adjective, the complete text "<adj> <noun>".

A pass's draws for a reference depend on (seed, pass, reference id) only, the pass being the
stream's (epoch, round): the same for every rank, worker and shard order. With fixed pairs they
depend on (seed, reference id): the same pair every epoch.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Callable

# One pair: (reference member index, target member index, metadata fields of the triplet).
Pair = tuple[int, int, dict]
Unit = list[Pair]
"""Pairs that stay together in one batch (MIT-States: a reference's two pairs)."""


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


def _fashion200k(captions: list[str], caption: int, images_of: dict[int, list[int]],
                 rng: random.Random) -> list[Unit]:
    """One pair to a sibling caption one word away (uniform among the valid siblings).

    Drawn as the original did, by redrawing a child until it qualifies; siblings with no
    differing word are rare ("white cotton top" / "cotton white top"), so after a few misses the
    valid ones are listed instead of redrawing without end."""
    source = captions[caption]
    for _ in range(8):
        target = rng.randrange(len(captions))
        if target != caption and different_words(source, captions[target]) is not None:
            break
    else:
        valid = [k for k in range(len(captions))
                 if k != caption and different_words(source, captions[k]) is not None]
        if not valid:
            return []
        target = rng.choice(valid)
    fields = {"modifier": replace_text(*different_words(source, captions[target])),
              "complete": captions[target], "target_label": captions[target]}
    return [[(-1, rng.choice(images_of[target]), fields)]]


def _mitstates(captions: list[str], caption: int, images_of: dict[int, list[int]],
               rng: random.Random) -> list[Unit]:
    """Two pairs to two different other adjectives of the noun, as one unit."""
    others = [k for k in range(len(captions)) if k != caption]
    if not others:
        return []
    targets = rng.sample(others, 2) if len(others) >= 2 else others * 2
    unit = []
    for target in targets:
        adjective = captions[target].split()[0]
        fields = {"modifier": adjective, "complete": captions[target],
                  "target_label": captions[target]}
        unit.append((-1, rng.choice(images_of[target]), fields))
    return [unit]


RULES: dict[str, Callable[..., list[Unit]]] = {"fashion200k": _fashion200k,
                                               "mitstates": _mitstates}
PAIRS_PER_REFERENCE = {"fashion200k": 1, "mitstates": 2}


def group_units(meta: dict, rng_for: Callable[[str], random.Random]) -> list[Unit]:
    """This pass's pairs of one group (a `schema.GroupMeta` as a dict), grouped in units.

    `rng_for(reference_id)` gives the random source of one reference's draws; it must return
    the same sequence for the same id in every group (the parent draw of Fashion200k is shared).
    """
    rule = RULES.get(meta["rule"])
    if rule is None:
        raise ValueError(f"unknown pairing rule {meta['rule']!r}; rules: {', '.join(RULES)}")
    captions, caption_of = meta["captions"], meta["caption_of"]
    slots = meta.get("slots") or [(0, 1)] * len(captions)
    images_of: dict[int, list[int]] = defaultdict(list)
    for member, caption in enumerate(caption_of):
        images_of[caption].append(member)
    units = []
    for member, reference_id in enumerate(meta["image_ids"]):
        caption = caption_of[member]
        slot, choices = slots[caption]
        if slot < 0:
            continue
        rng = rng_for(reference_id)
        if rng.randrange(choices) != slot:
            continue  # this pass, the reference belongs to another of its groups
        for unit in rule(captions, caption, images_of, rng):
            units.append([(member, target, fields) for _, target, fields in unit])
    return units


def rng_for(seed: int, draw: tuple[int, ...] | None) -> Callable[[str], random.Random]:
    """Per-reference random sources: fresh per `draw` (the stream passes (epoch, round)), or
    fixed for the seed when `draw` is None.

    Seeded with strings: Python hashes them with SHA-512, the same in every process."""
    prefix = f"{seed}/fixed" if draw is None else f"{seed}/" + "/".join(map(str, draw))
    return lambda reference_id: random.Random(f"{prefix}/{reference_id}")
