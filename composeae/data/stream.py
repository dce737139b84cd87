"""The streaming pipeline: WebDataset shards (local or S3) -> batches of tensors for each rank.

Training (`TrainStream`): every DDP rank must run the same number of steps or the collectives
hang, whatever the shard sizes. So each DataLoader worker reads an endless stream of shards:
round r of epoch e is a permutation of all shards seeded by (seed, e, r), dealt out to the
ranks x workers; when a worker's share runs out it moves to round r + 1. The stream is cut at
exactly `steps_per_epoch / workers` full batches per worker (`with_epoch`), so every rank yields
exactly `steps_per_epoch` batches. Within a round the ranks read disjoint shards (sampling without
replacement); with fewer shards than ranks x workers some workers share a shard in a round.

Evaluation (`eval_batches`): shard i goes to rank i % world_size, then to its DataLoader workers
in turn; no shuffling and no repetition, so across ranks every sample arrives exactly once and
the last partial batch is kept.

The rank and world size are passed explicitly (Ray Train sets RANK/WORLD_SIZE; the trainer reads
them) rather than read by `webdataset.split_by_node`, which only looks at the environment; this
also lets tests run several simulated ranks in one process.

Robustness: a shard that cannot be opened or read (corrupt, truncated, missing) is skipped with
a warning and counted in a `StreamErrors` object shared by the DataLoader workers
(`TrainStream.errors`, or the `errors` argument of `eval_batches`); an image that cannot be
decoded is skipped and counted the same way. An empty or unreachable shard set raises `UserError`
before any worker starts.

Batches are dicts: image tensors (B, 3, S, S), float32, normalised with `IMAGE_MEAN`/`IMAGE_STD`,
and one list per metadata field of the shard schema (strings). Images cross from the DataLoader
workers to the main process as uint8 (B, S, S, 3) and are normalised there: float32 batches are
four times the bytes, and moving them through shared memory cost more CPU than decoding
(measured: 11 vs 4.7 ms of CPU per batch of 64 triplets at 64 px), while normalising a batch
takes about a millisecond. Shards are parsed by the small tar reader at the end of this module,
not by tarfile (20 times faster, and it notices truncation).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import multiprocessing
import re
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms
from webdataset.gopen import gopen

from composeae.config import DataConfig
from composeae.data import schema, storage
from composeae.data.writer import read_manifest
from composeae.errors import UserError

log = logging.getLogger(__name__)

# ImageNet statistics: the torchvision backbones were trained with them.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

# Image keys of each shard kind and the batch keys they become.
_KIND_IMAGES = {
    "triplets": {schema.REFERENCE: "reference", schema.TARGET: "target"},
    "queries": {schema.REFERENCE: "reference"},
    "gallery": {schema.IMAGE: "image"},
}
EVAL_KINDS = ("queries", "gallery")


class StreamErrors:
    """Shards and samples skipped because they could not be read, counted across workers.

    The counters live in shared memory, so DataLoader worker processes add to the same numbers
    the main process reads. They belong to the default multiprocessing context, the one the
    DataLoader uses.
    """

    def __init__(self) -> None:
        self._shards = multiprocessing.Value("q", 0)
        self._samples = multiprocessing.Value("q", 0)

    @property
    def shards(self) -> int:
        return self._shards.value

    @property
    def samples(self) -> int:
        return self._samples.value

    def add_shard(self) -> None:
        with self._shards.get_lock():
            self._shards.value += 1

    def add_sample(self) -> None:
        with self._samples.get_lock():
            self._samples.value += 1


class SharedEpoch:
    """The current epoch, in shared memory so that persistent DataLoader workers see changes."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = multiprocessing.Value("q", epoch, lock=False)

    def get(self) -> int:
        return self._value.value

    def set(self, epoch: int) -> None:
        self._value.value = epoch


def _worker() -> tuple[int, int]:
    """(this DataLoader worker's index, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# --- manifest -> shard URLs --------------------------------------------------------------------

def _shards(url: str, manifest: dict, split: str, kind: str) -> list[dict]:
    """[{"url", "count"}] of one split/kind's shards; `UserError` when there are none."""
    entry = manifest["splits"].get(split, {}).get(kind)
    if not entry or not entry.get("shards") or not entry.get("count"):
        raise UserError(f"dataset at {url} has no {split} {kind} shards")
    names = [s["name"] for s in entry["shards"]]
    _check_present(url, names)
    return [{"url": storage.join(url, s["name"]), "count": int(s["count"])}
            for s in entry["shards"]]


def _check_present(url: str, names: list[str]) -> None:
    """One listing instead of a request per shard: fail early when shards are missing."""
    present = set(storage.listdir(url))
    missing = [n for n in names if n not in present]
    if missing:
        raise UserError(f"{len(missing)} of {len(names)} shards listed in the manifest are "
                        f"missing at {url}, e.g. {missing[0]}")


def has_split(data: DataConfig, split: str) -> bool:
    """Whether the dataset's manifest lists `split` (the writer refuses splits with no samples)."""
    return split in read_manifest(data.url)["splits"]


def load_corpus(data: DataConfig) -> list[str]:
    """Every training text of the dataset, one per entry (for vocabularies and tokenizers)."""
    manifest = read_manifest(data.url)
    corpus_url = storage.join(data.url, manifest["corpus"])
    try:
        return storage.read_text(corpus_url).splitlines()
    except FileNotFoundError:
        raise UserError(f"dataset at {data.url} has no corpus file {manifest['corpus']}") from None


# --- pipeline stages (classes, not lambdas: DataLoader workers may need to pickle them) --------

class _TrainShards(IterableDataset):
    """Endless shard stream for one rank and worker: successive seeded rounds of all shards."""

    def __init__(self, shards: list[dict], seed: int, epoch: SharedEpoch, rank: int,
                 world_size: int):
        self.shards, self.seed, self.epoch = shards, seed, epoch
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        me, everyone = self.rank * workers + worker, self.world_size * workers
        n, epoch = len(self.shards), self.epoch.get()
        for round_ in itertools.count():
            order = np.random.default_rng([self.seed, epoch, round_]).permutation(n)
            # With fewer shards than readers, reader i takes shard i mod n: nobody starves.
            for i in range(me, max(n, everyone), everyone):
                yield self.shards[order[i % n]]


class _EvalShards(IterableDataset):
    """Finite shard stream: this worker's share of this rank's shards, in order."""

    def __init__(self, shards: list[dict]):
        self.shards = shards

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        yield from self.shards[worker::workers]


class _ShardSamples:
    """{"url", "count"} stream -> raw samples; unreadable shards are skipped, warned about, counted.

    Samples are grouped per shard, so a truncated shard cannot leak a half sample into the next
    one. A tar cut at a member boundary reads as a shorter valid archive, so a shard is also
    failed when it yields another number of samples than the manifest's count. An endless
    stream whose shards keep failing would spin forever: after `max_failures` shards in a row
    without a sample it raises instead.
    """

    def __init__(self, errors: StreamErrors, max_failures: int | None = None):
        self.errors = errors
        self.max_failures = max_failures

    def __call__(self, shards: Iterator[dict]) -> Iterator[dict]:
        failures = 0
        for shard in shards:
            url = shard["url"]
            delivered = 0
            try:
                for sample in self._samples(url):
                    delivered += 1
                    yield sample
                if delivered != shard["count"]:
                    raise ValueError(f"truncated: {delivered} samples, the manifest says "
                                     f"{shard['count']}")
            except Exception as exc:
                self.errors.add_shard()
                log.warning("skipping unreadable shard %s after %d samples: %s", url, delivered,
                            f"{type(exc).__name__}: {exc}")
                failures = 0 if delivered else failures + 1
                if self.max_failures is not None and failures >= self.max_failures:
                    raise UserError(f"{failures} shards in a row could not be read, the last "
                                    f"one {url}: {exc}") from exc
            else:
                failures = 0

    @staticmethod
    def _samples(url: str) -> Iterator[dict]:
        with _open_shard(url) as stream:
            yield from tar_samples(stream, url)


def _open_shard(url: str):
    """Local files and S3 through `storage` (large read buffers); other schemes through gopen."""
    if storage.is_s3(url) or "://" not in url and not url.startswith("pipe:"):
        return storage.open_read(url)
    return gopen(url, "rb")


# --- tar reading -------------------------------------------------------------------------------
# Python's tarfile (which webdataset's tar iterator uses) parses every header field in Python:
# about 80 us per sample, a fifth of decoding a 64 px triplet. Shards are plain tar files written
# by `composeae.data.writer`, so this minimal reader does what the pipeline needs at ~4 us.

_BLOCK = 512
_END_BLOCK = bytes(_BLOCK)
# WebDataset's rule: the key is the path up to the first '.' of the file name, the rest the ext.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def tar_samples(stream, url: str) -> Iterator[dict]:
    """Samples of a WebDataset tar stream: {"__key__", "__url__", ext: bytes, ...}."""
    sample: dict | None = None
    for name, data in tar_members(stream):
        match = _KEY_EXT.match(name)
        if match is None:
            continue
        key, ext = match.group(1), match.group(2).lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if ext in sample:
            raise ValueError(f"{url}: {name} appears twice in one sample")
        sample[ext] = data
    if sample is not None:
        yield sample


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file in a tar stream (ustar, PAX paths, GNU long names).

    Raises on a block that is not a tar header (a corrupt shard) and, unlike tarfile, on an
    archive that ends without its end-of-archive block (a truncated shard).
    """
    long_name = None
    while True:
        header = _read_exact(stream, _BLOCK)
        if header == _END_BLOCK:
            return
        _check_header(header)
        size = _octal(header[124:136])
        data = _read_exact(stream, size)
        _read_exact(stream, -size % _BLOCK)
        kind = header[156:157]
        if kind in (b"0", b"\0"):
            yield long_name or _header_name(header), data
            long_name = None
        elif kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8")
        elif kind == b"x":  # PAX header of the next member
            long_name = _pax_path(data) or long_name


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            raise EOFError(f"tar archive ends early (truncated): wanted {n} bytes, got {len(data)}")
        data += more
    return data


def _check_header(header: bytes) -> None:
    # The ustar magic (also in GNU and PAX headers) rather than the header checksum, which costs
    # 10 us per member in Python; whole-shard integrity is what `shards verify` checks (sha256).
    if header[257:262] != b"ustar":
        raise ValueError("not a tar header (corrupt archive)")


def _octal(field: bytes) -> int:
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8")


def _pax_path(records: bytes) -> str | None:
    """The `path` record of a PAX extended header ("<len> key=value\\n" records)."""
    path = None
    while records:
        length = int(records.split(b" ", 1)[0])
        key, _, value = records[:length].split(b" ", 1)[1].rstrip(b"\n").partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        records = records[length:]
    return path


class SampleDecoder:
    """Raw sample -> {batch key: uint8 image tensor (S, S, 3) or metadata string}.

    Images stay uint8 through `collate` and the DataLoader's transfer between processes, and
    `normalise_batch` converts whole batches at the end (see the module docstring). With
    `errors`, an undecodable sample is warned about, counted and returned as None; without, the
    error propagates.
    """

    def __init__(self, kind: str, image_size: int, augment: bool = False,
                 errors: StreamErrors | None = None):
        self.kind = kind
        self.images = _KIND_IMAGES[kind]
        self.image_size = image_size
        self.errors = errors
        # Mild crops keep the modified object in view; flips are fine for real photos.
        self.augment = transforms.Compose([
            transforms.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True),
            transforms.RandomHorizontalFlip(),
        ]) if augment else None

    def __call__(self, sample: dict) -> dict | None:
        try:
            out = json.loads(sample[schema.META])
            for key, name in self.images.items():
                out[name] = self.pixels(_open_image(sample, key))
            return out
        except Exception as exc:
            if self.errors is None:
                raise
            self.errors.add_sample()
            log.warning("skipping undecodable %s sample %s in %s: %s: %s", self.kind,
                        sample.get("__key__"), sample.get("__url__"), type(exc).__name__, exc)
            return None

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> resized (or augmented) uint8 tensor (S, S, 3)."""
        size = (self.image_size, self.image_size)
        if self.augment is not None:
            image = self.augment(image)
        elif image.size != size:
            image = image.resize(size, Image.BILINEAR)
        return torch.from_numpy(np.array(image, dtype=np.uint8))


# Normalisation folded into one subtract and one multiply on 0..255 pixels, shaped (3, 1, 1).
_MEAN_255 = (np.array(IMAGE_MEAN, dtype=np.float32) * 255).reshape(3, 1, 1)
_INV_STD_255 = (1 / (np.array(IMAGE_STD, dtype=np.float32) * 255)).reshape(3, 1, 1)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, S, S, 3) -> float32 (B, 3, S, S) with ImageNet mean/std.

    In numpy on purpose: this runs in the trainer's process, where torch's intra-op thread
    pool would wake (and spin) threads that the DataLoader workers and the model need.
    """
    images = pixels.numpy().transpose(0, 3, 1, 2).astype(np.float32, order="C")  # (B, 3, S, S)
    np.subtract(images, _MEAN_255, out=images)
    np.multiply(images, _INV_STD_255, out=images)
    return torch.from_numpy(images)


def _open_image(sample: dict, key: str) -> Image.Image:
    for ext in schema.IMAGE_EXTS:
        data = sample.get(f"{key}.{ext}")
        if data is not None:
            return Image.open(io.BytesIO(data)).convert("RGB")
    raise KeyError(f"no {key}.{{{','.join(schema.IMAGE_EXTS)}}} image")


def _decoded(samples: Iterator[dict], decode: SampleDecoder) -> Iterator[dict]:
    for sample in samples:
        out = decode(sample)
        if out is not None:
            yield out


class _DecodeStage:
    """Pipeline stage around `SampleDecoder` that drops the samples it could not decode."""

    def __init__(self, decode: SampleDecoder):
        self.decode = decode

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        return _decoded(samples, self.decode)


class _SeededShuffle:
    """Sample shuffle buffer seeded per (seed, epoch, rank, worker): reproducible runs."""

    def __init__(self, bufsize: int, initial: int, seed: int, epoch: SharedEpoch, rank: int):
        self.bufsize, self.initial = bufsize, initial
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        worker, _ = _worker()
        key = [self.seed, self.epoch.get(), self.rank, worker]
        state = np.random.SeedSequence(key).generate_state(1)
        return wds.shuffle(self.bufsize, self.initial, seed=int(state[0]))(samples)


def collate(samples: list[dict]) -> dict:
    """Decoded samples -> batch: uint8 images stacked to (B, S, S, 3), strings as lists."""
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def normalise_batch(batch: dict) -> dict:
    """Collated batch -> the same with every image as float32 (B, 3, S, S), normalised."""
    return {k: normalise(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _normalised(batches: Iterator[dict]) -> Iterator[dict]:
    for batch in batches:
        yield normalise_batch(batch)


def _as_is(batch: dict) -> dict:
    """DataLoader collate_fn for ready-made batches (its default walks every string)."""
    return batch


# --- public entry points -----------------------------------------------------------------------

class TrainStream:
    """Training batches of triplets for one DDP rank, `steps_per_epoch` of them every epoch.

    Batch: "reference", "target" (B, 3, S, S) float32; "modifier", "complete", "target_label",
    "reference_id", "target_id", "group" lists of str.
    """

    def __init__(self, data: DataConfig, batch_size: int, *, rank: int, world_size: int,
                 seed: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.data, self.batch_size = data, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        manifest = read_manifest(data.url)
        self.shards = _shards(data.url, manifest, schema.TRAIN_SPLIT, "triplets")
        self.num_samples = sum(s["count"] for s in self.shards)
        self.workers = max(1, data.loader_workers)
        # open_clip's rule: an epoch is one pass of the global batch over the data, rounded up
        # to whole batches and to a multiple of the workers, which each yield an equal share.
        steps = math.ceil(self.num_samples / (batch_size * world_size))
        self.steps_per_epoch = math.ceil(steps / self.workers) * self.workers
        self.errors = StreamErrors()
        self._epoch = SharedEpoch()
        self._loader: DataLoader | None = None
        if len(self.shards) < world_size * self.workers:
            log.warning("%d training shards for %d ranks x %d loader workers: some workers read "
                        "the same shard in a round; smaller shards mix better",
                        len(self.shards), world_size, self.workers)

    @property
    def skipped_shards(self) -> int:
        """Unreadable shards skipped so far (all epochs, all workers of this rank)."""
        return self.errors.shards

    def _pipeline(self) -> wds.DataPipeline:
        bufsize = self.data.shuffle_buffer
        return wds.DataPipeline(
            _TrainShards(self.shards, self.seed, self._epoch, self.rank, self.world_size),
            # Give up on an endless stream only after every shard failed twice in a row.
            _ShardSamples(self.errors, max_failures=2 * len(self.shards) + 2),
            _SeededShuffle(bufsize, min(bufsize, max(self.batch_size, bufsize // 4)),
                           self.seed, self._epoch, self.rank),
            _DecodeStage(SampleDecoder("triplets", self.data.image_size, self.data.augment,
                                       self.errors)),
            wds.batched(self.batch_size, collation_fn=collate, partial=False),
        ).with_epoch(self.steps_per_epoch // self.workers)

    def epoch(self, epoch: int) -> Iterator[dict]:
        """Exactly `steps_per_epoch` batches; the shard order depends on (seed, epoch) only.

        Starting an epoch ends the previous one (its iterator must not be used any more).
        """
        self._epoch.set(epoch)
        if self._loader is None:
            # Persistent workers: forking and warming up workers every epoch cost ~0.1 s of CPU;
            # they read the new epoch from shared memory when the next iteration starts.
            workers = self.data.loader_workers
            self._loader = DataLoader(
                self._pipeline(), batch_size=None, collate_fn=_as_is,
                num_workers=workers, persistent_workers=workers > 0,
                # Seeds the workers' torch RNG (augmentation) reproducibly per rank.
                generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank),
            )
        return _normalised(iter(self._loader))


def eval_batches(data: DataConfig, split: str, kind: str, batch_size: int, *, rank: int,
                 world_size: int, errors: StreamErrors | None = None) -> Iterator[dict]:
    """Batches of one evaluation split's queries or gallery for one rank (none if it has no shard).

    Across ranks every sample is delivered exactly once; the last batch of a worker may be
    partial. Queries: "reference" (B, 3, S, S), "modifier", "complete", "target_label",
    "target_id", "reference_id", "query_id", "group". Gallery: "image" (B, 3, S, S), "image_id",
    "label", "caption", "group". Pass `errors` to observe skipped shards and samples.
    """
    if kind not in EVAL_KINDS:
        raise ValueError(f"kind must be one of {EVAL_KINDS}, got {kind!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    errors = errors if errors is not None else StreamErrors()
    mine = _shards(data.url, read_manifest(data.url), split, kind)[rank::world_size]
    if not mine:
        return iter(())
    pipeline = wds.DataPipeline(
        _EvalShards(mine),
        _ShardSamples(errors),
        _DecodeStage(SampleDecoder(kind, data.image_size, False, errors)),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    return _normalised(iter(DataLoader(pipeline, batch_size=None, collate_fn=_as_is,
                                       num_workers=min(data.loader_workers, len(mine)))))
