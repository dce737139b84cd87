"""The shard schema: the one place that names sample keys, shard kinds and manifest fields.

Every writer (CSS-synth generator, dataset converters) and every reader (the streaming pipeline)
imports these names, so the two sides cannot drift apart.

A dataset directory (local or `s3://bucket/prefix`) holds:

    manifest.json                     written last: its presence means the dataset is complete
    corpus.txt                        every training text (modifier and complete), one per line,
                                      used to build the LSTM vocabulary / WordPiece tokenizer
    {split}-{kind}-{index:06d}.tar    WebDataset shards, kind in SHARD_KINDS

Splits: "train" holds triplets (fixed pairs) or groups (pairs drawn at every step); "val" and
"test" hold queries and a gallery.

Samples (WebDataset keys; images are PNG or JPEG bytes):
    triplets: ref.{png,jpg}, tgt.{png,jpg},        json = TripletMeta
    groups:   img0.{png,jpg}, img1.{png,jpg}, ...  json = GroupMeta (member j's image is img<j>)
    queries:  ref.{png,jpg},                       json = QueryMeta
    gallery:  img.{png,jpg},                       json = GalleryMeta

Dataset properties that readers act on live in the manifest's params under the names below
(`EXCLUDE_REFERENCE`, `JOINT_GALLERY`, `PAIRING`); a manifest without one gets its default.

Hit rule at evaluation: a gallery item answers a query when `GalleryMeta.label ==
QueryMeta.target_label` and both share `group`; unless the manifest turns `EXCLUDE_REFERENCE`
off (FashionIQ, whose protocols keep it), the gallery item of the query's group whose `image_id`
equals the query's `reference_id` is excluded. With `JOINT_GALLERY` the queries are also ranked
against one gallery of every group. Queries with a `subset` are also scored by Recall_subset@K:
the target's rank among the subset's gallery images, the reference excluded. Label-level (CSS:
canonical scene), caption-level (Fashion200k, MIT-States: the caption) and id-level (FashionIQ,
CIRR: the image id) hits are all expressed by what the writer puts in `label`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

MANIFEST = "manifest.json"
CORPUS = "corpus.txt"
MANIFEST_VERSION = 1

TRAIN_SPLIT = "train"
EVAL_SPLITS = ("val", "test")

# Shard kinds. The train split holds exactly one of TRAIN_KINDS, an evaluation split both
# EVAL_KINDS.
TRIPLETS = "triplets"
GROUPS = "groups"
QUERIES = "queries"
GALLERY = "gallery"
TRAIN_KINDS = (TRIPLETS, GROUPS)
EVAL_KINDS = (QUERIES, GALLERY)
SHARD_KINDS = TRAIN_KINDS + EVAL_KINDS

# WebDataset keys (the extension after the first dot decides the decoder).
REFERENCE = "ref"
TARGET = "tgt"
IMAGE = "img"
META = "json"
IMAGE_EXTS = ("png", "jpg")

# Image keys each kind carries, and the batch key each becomes in the stream. Groups carry a
# variable number of images, `group_image_key(j)`, and become triplets before they are batched.
KIND_IMAGES = {
    TRIPLETS: (REFERENCE, TARGET),
    QUERIES: (REFERENCE,),
    GALLERY: (IMAGE,),
}
BATCH_IMAGE_KEYS = {REFERENCE: "reference", TARGET: "target", IMAGE: "image"}

# Manifest params read by the stream and by evaluation.
EXCLUDE_REFERENCE = "exclude_reference"
"""bool: the query's own reference image is left out of its ranking (default True)."""
JOINT_GALLERY = "joint_gallery"
"""bool: also score every query against one gallery of all groups (default False)."""
PAIRING = "pairing"
"""dict for group datasets: {"rule": name in composeae.data.pairing.RULES, "references": number
of reference images, "pairs_per_epoch": pairs the stream draws per pass}."""


def group_image_key(index: int) -> str:
    """Key of member `index`'s image in a group sample (`img0`, `img1`, ...)."""
    return f"{IMAGE}{index}"


def shard_name(split: str, kind: str, index: int) -> str:
    """File name of one shard, e.g. `train-triplets-000003.tar`."""
    return f"{split}-{kind}-{index:06d}.tar"


@dataclass(frozen=True)
class TripletMeta:
    """Metadata of one training triplet (reference image + modifier -> target image)."""
    reference_id: str
    target_id: str
    modifier: str
    complete: str
    """The paper's "complete text query" (e.g. the target caption)."""
    target_label: str
    group: str = ""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GroupMeta:
    """One pairing group of the train split: images among which the stream draws a fresh
    reference -> target pair at every pass (Fashion200k: the captions one word away from a parent
    caption; MIT-States: the images of one noun). `composeae.data.pairing` holds the rules."""
    key: str
    """The group's name: the parent caption or the noun."""
    rule: str
    image_ids: tuple[str, ...]
    """Member j's image id; its image is `group_image_key(j)`."""
    captions: tuple[str, ...]
    """The group's distinct captions (the hit-level labels of its images)."""
    caption_of: tuple[int, ...]
    """Member j's caption is `captions[caption_of[j]]`."""
    slots: tuple[tuple[int, int], ...] = ()
    """Per caption (slot, choices): an image of the caption is a reference in this group when a
    uniform draw in range(choices) equals slot (Fashion200k: its parent captions, of which this
    group is one); slot -1: never a reference here. Empty: (0, 1) for every caption."""
    texts: tuple[str, ...] = ()
    """Training texts of the group for the corpus (modifiers and complete texts)."""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class QueryMeta:
    """Metadata of one evaluation query."""
    query_id: str
    reference_id: str
    modifier: str
    complete: str
    target_label: str
    target_id: str = ""
    group: str = ""
    subset: tuple[str, ...] = ()
    """Image ids of the query's candidate set (CIRR's img_set members) for Recall_subset@K;
    empty when the dataset has none."""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GalleryMeta:
    """Metadata of one gallery image."""
    image_id: str
    label: str
    caption: str = ""
    group: str = ""

    def to_json(self) -> dict:
        return asdict(self)
