"""The streaming pipelines: WebDataset shards (local or S3) -> batches of tensors for each rank.

What belongs here: the pipeline stages that know about ranks, workers and epochs, and the two
entry points, `TrainStream` and `eval_batches`. Each pipeline is a list of stages; the manifest
is read by `composeae.data.shardset`, tars by `composeae.data.tarstream`, images by
`composeae.data.decode`, and training pairs are drawn by the rules of `composeae.data.pairing`.

Training (`TrainStream`): every DDP rank must run the same number of steps or the collectives
hang, whatever the shard sizes. So each DataLoader worker reads an endless stream of shards:
round r of epoch e is a permutation of all shards seeded by (seed, e, r), dealt out to the
ranks x workers; when a worker's share runs out it moves to round r + 1. The stream is cut at
exactly `steps_per_epoch / workers` full batches per worker (`with_epoch`), so every rank yields
exactly `steps_per_epoch` batches. Within a round the ranks read disjoint shards (sampling without
replacement); with fewer shards than ranks x workers some workers share a shard in a round.

The train split holds fixed triplets, mixed by a seeded shuffle buffer, or pairing groups
(Fashion200k, MIT-States): a worker keeps `open_groups` groups open, draws this pass's pairs of
each (`pairing.group_units`) and hands out their units in random order across the open groups,
so a batch mixes many groups. A unit (one pair, or MIT-States' two pairs of one reference) is
never split across batches when the batch size is a multiple of its size.

Evaluation (`eval_batches`): shard i goes to rank i % world_size, then to its DataLoader workers
in turn; no shuffling and no repetition, so across ranks every sample arrives exactly once and
the last partial batch is kept.

Resuming (`TrainStream.epoch(e)` then skipping the batches already trained): at the same world
size the resumed epoch yields exactly the batches the interrupted one had left. At another world
size (an elastic group resized), the epoch's shards are dealt over the new ranks from the start
and the same number of batches is skipped, so within that epoch some samples can repeat and
others be skipped: at most the samples trained before the resize (`done` steps x global batch),
never more than one epoch's worth; from the next epoch on every sample is seen once per epoch.

The rank and world size are passed explicitly (Ray Train sets RANK/WORLD_SIZE; the trainer reads
them) rather than read by `webdataset.split_by_node`, which only looks at the environment; this
also lets tests run several simulated ranks in one process.

Robustness: a shard that cannot be opened or read (corrupt, truncated, missing) is skipped with
a warning and counted in a `StreamErrors` object shared by the DataLoader workers
(`TrainStream.errors`, or the `errors` argument of `eval_batches`); an image that cannot be
decoded is skipped (with the rest of its unit) and counted the same way. An empty or unreachable
shard set raises `UserError` before any worker starts.

Batches are dicts: image tensors (B, 3, S, S), float32, normalised with `IMAGE_MEAN`/`IMAGE_STD`,
and one list per metadata field of the shard schema. The trainer and evaluation ask for the
images as uint8 (B, S, S, 3) instead (`normalise=False`) and hand the batches to
`composeae.data.device.device_batches`, which normalises them on the device; and with `tokenize`
(a picklable callable: strings -> `Tokens`, the model's `RetrievalModel.tokenize_fn`) the loader
workers tokenise the modifier too, into the batch's "tokens", so the trainer's process never
walks the strings.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import multiprocessing
import random
import zlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from composeae.config import DataConfig
from composeae.data import pairing, schema, shardset
from composeae.data.decode import SampleDecoder, collate, normalise_batch
from composeae.data.shardset import read_manifest
from composeae.data.tarstream import ShardSamples, StreamErrors
from composeae.errors import UserError

log = logging.getLogger(__name__)


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


# --- stages (classes, not lambdas: DataLoader workers may need to pickle them) -----------------

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
                yield dict(self.shards[order[i % n]], round=round_)


class _EvalShards(IterableDataset):
    """Finite shard stream: this worker's share of this rank's shards, in order."""

    def __init__(self, shards: list[dict]):
        self.shards = shards

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        yield from self.shards[worker::workers]


def _stream_seed(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


class _SeededShuffle:
    """Sample shuffle buffer seeded per (seed, epoch, rank, worker): reproducible runs."""

    def __init__(self, bufsize: int, initial: int, seed: int, epoch: SharedEpoch, rank: int):
        self.bufsize, self.initial = bufsize, initial
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        worker, _ = _worker()
        seed = _stream_seed(self.seed, self.epoch.get(), self.rank, worker)
        return wds.shuffle(self.bufsize, self.initial, seed=seed)(samples)


def _units(samples: Iterator[dict]) -> Iterator[list[dict]]:
    """Triplets as one-sample units, the shape the pair stage hands on."""
    for sample in samples:
        yield [sample]


class _GroupPairs:
    """Group samples -> units of raw triplet samples drawn for this pass, interleaved.

    `open_groups` groups are open at a time; each next unit comes from an open group chosen with
    probability proportional to the units it has left, so a batch draws on all of them. The
    interleaving order is seeded per (seed, epoch, rank, worker); the pairs themselves by
    `pairing.rng_for` per (seed, epoch, round): a group read again in a later round of the
    endless shard stream draws anew. Fixed pairs leave epoch and round out.
    """

    def __init__(self, fixed: bool, open_groups: int, seed: int, epoch: SharedEpoch, rank: int):
        self.fixed, self.open_groups = fixed, open_groups
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, samples: Iterator[dict]) -> Iterator[list[dict]]:
        worker, _ = _worker()
        epoch = self.epoch.get()
        order = random.Random(_stream_seed(self.seed, epoch, self.rank, worker))
        open_: list[list[list[dict]]] = []
        for sample in samples:
            draw = pairing.rng_for(self.seed, None if self.fixed
                                   else (epoch, sample.get("__round__", 0)))
            units = self._units(sample, draw)
            if units:
                order.shuffle(units)
                open_.append(units)
            while len(open_) >= self.open_groups:
                yield self._pick(open_, order)
        while open_:
            yield self._pick(open_, order)

    @staticmethod
    def _pick(open_: list[list[list[dict]]], order: random.Random) -> list[dict]:
        index = order.choices(range(len(open_)), weights=[len(u) for u in open_])[0]
        unit = open_[index].pop()
        if not open_[index]:
            open_.pop(index)
        return unit

    @staticmethod
    def _units(sample: dict, draw) -> list[list[dict]]:
        try:
            meta = json.loads(sample[schema.META])
            images = []
            for member in range(len(meta["image_ids"])):
                key = schema.group_image_key(member)
                ext = next(e for e in schema.IMAGE_EXTS if f"{key}.{e}" in sample)
                images.append((ext, sample[f"{key}.{ext}"]))
            units = pairing.group_units(meta, draw)
        except Exception as exc:  # a malformed group is skipped like an undecodable sample
            log.warning("skipping malformed group %s in %s: %s: %s", sample.get("__key__"),
                        sample.get("__url__"), type(exc).__name__, exc)
            return []
        ids = meta["image_ids"]
        out = []
        for unit in units:
            pairs = []
            for reference, target, fields in unit:
                (ref_ext, ref), (tgt_ext, tgt) = images[reference], images[target]
                pairs.append({
                    "__key__": f"{sample['__key__']}/{reference}-{target}",
                    "__url__": sample.get("__url__"),
                    f"{schema.REFERENCE}.{ref_ext}": ref, f"{schema.TARGET}.{tgt_ext}": tgt,
                    schema.META: {"reference_id": ids[reference], "target_id": ids[target],
                                  "group": "", **fields},
                })
            out.append(pairs)
        return out


class _DecodeUnits:
    """Decode every sample of a unit; a unit with an undecodable sample is dropped whole.

    With `seed` and `epoch` (training with augmentation), each sample's random crop and flip
    draw from torch's generator seeded by (seed, epoch, sample key) alone: the same in a resumed
    run, which replays the skipped part of an epoch in fresh workers, and whichever worker or
    rank decodes the sample. The caller's random state is left as it was.
    """

    def __init__(self, decode: SampleDecoder, seed: int | None = None,
                 epoch: SharedEpoch | None = None):
        self.decode, self.seed, self.epoch = decode, seed, epoch

    def _decode(self, sample: dict) -> dict | None:
        if self.epoch is None:
            return self.decode(sample)
        key = zlib.crc32(str(sample.get("__key__", "")).encode())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_stream_seed(self.seed, self.epoch.get(), key))
            return self.decode(sample)

    def __call__(self, units: Iterator[list[dict]]) -> Iterator[list[dict]]:
        for unit in units:
            decoded = [self._decode(sample) for sample in unit]
            if all(d is not None for d in decoded):
                yield decoded


class _Batches:
    """Units -> batches of exactly `size` samples (`partial`: also the last, smaller one)."""

    def __init__(self, size: int, partial: bool):
        self.size, self.partial = size, partial

    def __call__(self, units: Iterator[list[dict]]) -> Iterator[dict]:
        batch: list[dict] = []
        for unit in units:
            batch.extend(unit)
            while len(batch) >= self.size:
                yield collate(batch[: self.size])
                batch = batch[self.size:]
        if batch and self.partial:
            yield collate(batch)


class _Tokenize:
    """Batches -> the same with "tokens": `tokenize(batch[key])`, made in the loader worker."""

    def __init__(self, tokenize: Callable[[Sequence[str]], Any], key: str):
        self.tokenize, self.key = tokenize, key

    def __call__(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            batch[TOKENS] = self.tokenize(batch[self.key])
            yield batch


TOKENS = "tokens"
"""Batch key of the tokenised text (`composeae.models.text.Tokens`)."""


def _tokenized(tokenize: Callable | None, key: str | None) -> list:
    return [_Tokenize(tokenize, key)] if tokenize is not None and key else []


def _normalised(batches: Iterator[dict]) -> Iterator[dict]:
    for batch in batches:
        yield normalise_batch(batch)


def _as_is(batch: dict) -> dict:
    """DataLoader collate_fn for ready-made batches (its default walks every string)."""
    return batch


# --- public entry points -----------------------------------------------------------------------

class TrainStream:
    """Training batches of triplets for one DDP rank, `steps_per_epoch` of them every epoch.

    Batch: "reference", "target" (B, 3, S, S) float32 (uint8 (B, S, S, 3) with
    `normalise=False`); "modifier", "complete", "target_label", "reference_id", "target_id",
    "group" lists of str; with `tokenize`, "tokens" of the `data.text_mode` field.
    """

    def __init__(self, data: DataConfig, batch_size: int, *, rank: int, world_size: int,
                 seed: int, tokenize: Callable[[Sequence[str]], Any] | None = None,
                 normalise: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if data.open_groups < 1:
            raise UserError(f"config key data.open_groups must be > 0, got {data.open_groups}")
        self.data, self.batch_size = data, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.tokenize, self.normalise = tokenize, normalise
        manifest = read_manifest(data.url)
        self.kind = shardset.train_kind(data.url, manifest)
        self.shards = shardset.shard_list(data.url, manifest, schema.TRAIN_SPLIT, self.kind)
        if self.kind == schema.GROUPS:
            # A group yields its pairs, not itself: the epoch is one pass over the references.
            self.num_samples = int(shardset.pairing(data.url, manifest)["pairs_per_epoch"])
        else:
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
        data, epoch = self.data, self._epoch
        if self.kind == schema.GROUPS:
            mix = [_GroupPairs(data.pairs == "fixed", data.open_groups, self.seed, epoch,
                               self.rank)]
        else:
            bufsize = data.shuffle_buffer
            mix = [_SeededShuffle(bufsize, min(bufsize, max(self.batch_size, bufsize // 4)),
                                  self.seed, epoch, self.rank),
                   _units]
        return wds.DataPipeline(
            _TrainShards(self.shards, self.seed, epoch, self.rank, self.world_size),
            # Give up on an endless stream only after every shard failed twice in a row.
            ShardSamples(self.errors, max_failures=2 * len(self.shards) + 2),
            *mix,
            _DecodeUnits(SampleDecoder(schema.TRIPLETS, data.image_size, data.augment,
                                       self.errors),
                         *((self.seed, epoch) if data.augment else ())),
            _Batches(self.batch_size, partial=False),
            *_tokenized(self.tokenize, data.text_mode),
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
        batches = iter(self._loader)
        return _normalised(batches) if self.normalise else batches


def eval_batches(data: DataConfig, split: str, kind: str, batch_size: int, *, rank: int,
                 world_size: int, errors: StreamErrors | None = None,
                 tokenize: Callable[[Sequence[str]], Any] | None = None,
                 normalise: bool = True) -> Iterator[dict]:
    """Batches of one evaluation split's queries or gallery for one rank (none if it has no shard).

    Across ranks every sample is delivered exactly once; the last batch of a worker may be
    partial. Queries: "reference" (B, 3, S, S), "modifier", "complete", "target_label",
    "target_id", "reference_id", "query_id", "group", "subset". Gallery: "image" (B, 3, S, S),
    "image_id", "label", "caption", "group". Pass `errors` to observe skipped shards and samples.
    `tokenize` and `normalise` as for `TrainStream` (queries only carry text to tokenise).
    """
    if kind not in schema.EVAL_KINDS:
        raise ValueError(f"kind must be one of {schema.EVAL_KINDS}, got {kind!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    errors = errors if errors is not None else StreamErrors()
    mine = shardset.shard_list(data.url, read_manifest(data.url), split, kind)[rank::world_size]
    if not mine:
        return iter(())
    pipeline = wds.DataPipeline(
        _EvalShards(mine),
        ShardSamples(errors),
        _units,
        _DecodeUnits(SampleDecoder(kind, data.image_size, False, errors)),
        _Batches(batch_size, partial=True),
        *_tokenized(tokenize, data.text_mode if kind == schema.QUERIES else None),
    )
    batches = iter(DataLoader(pipeline, batch_size=None, collate_fn=_as_is,
                              num_workers=min(data.loader_workers, len(mine))))
    return _normalised(batches) if normalise else batches
