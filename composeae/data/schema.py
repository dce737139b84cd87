"""The shard schema: the one place that names sample keys, shard kinds and manifest fields.

Every writer (CSS-synth generator, dataset converters) and every reader (the streaming pipeline)
imports these names, so the two sides cannot drift apart.

A dataset directory (local or `s3://bucket/prefix`) holds:

    manifest.json                     written last: its presence means the dataset is complete
    corpus.txt                        every training text (modifier and complete), one per line,
                                      used to build the LSTM vocabulary / WordPiece tokenizer
    {split}-{kind}-{index:06d}.tar    WebDataset shards, kind in SHARD_KINDS

Splits: "train" holds triplets; "val" and "test" hold queries and a gallery.

Samples (WebDataset keys; images are PNG or JPEG bytes):
    triplets: ref.{png,jpg}, tgt.{png,jpg}, json = TripletMeta
    queries:  ref.{png,jpg},                json = QueryMeta
    gallery:  img.{png,jpg},                json = GalleryMeta

Hit rule at evaluation: a gallery item answers a query when `GalleryMeta.label ==
QueryMeta.target_label` and both share `group`; the gallery item whose `image_id` equals the
query's `reference_id` is excluded. Queries with a `subset` are also scored by Recall_subset@K:
the target's rank among the subset's gallery images, the reference excluded. Label-level (CSS: canonical scene), caption-level
(Fashion200k, MIT-States: the caption) and id-level (FashionIQ, CIRR: the image id) hits are all
expressed by what the writer puts in `label`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

MANIFEST = "manifest.json"
CORPUS = "corpus.txt"
MANIFEST_VERSION = 1

TRAIN_SPLIT = "train"
EVAL_SPLITS = ("val", "test")
SHARD_KINDS = ("triplets", "queries", "gallery")

# WebDataset keys (the extension after the first dot decides the decoder).
REFERENCE = "ref"
TARGET = "tgt"
IMAGE = "img"
META = "json"
IMAGE_EXTS = ("png", "jpg")


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
