"""Decoding: raw samples -> uint8 image tensors and metadata; batches -> normalised float32.

What belongs here: image geometry (the evaluation transform and the training augmentation),
`SampleDecoder`, collating decoded samples into a batch and normalising it. Nothing here reads
shards or knows about ranks.

Geometry, as the original ComposeAE/TIRG transforms: without augmentation an image is resized so
that its short side is the target size, then centre-cropped to a square (no aspect distortion);
with augmentation, a mild random resized crop and a horizontal flip. Images cross from the
DataLoader workers to the main process as uint8 (B, S, S, 3) and are normalised there: float32
batches are four times the bytes, and moving them through shared memory cost more CPU than
decoding (measured: 11 vs 4.7 ms of CPU per batch of 64 triplets at 64 px), while normalising a
batch takes about a millisecond.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import torch
from PIL import Image

from composeae.data import schema
from composeae.data.tarstream import StreamErrors

log = logging.getLogger("composeae.data.stream")

# ImageNet statistics: the torchvision backbones were trained with them.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Short side to `size` (bilinear), then the central `size` x `size` square, as
    torchvision's Resize(size) + CenterCrop(size)."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    if width <= height:
        new = (size, max(size, int(size * height / width)))
    else:
        new = (max(size, int(size * width / height)), size)
    if new != (width, height):
        image = image.resize(new, Image.BILINEAR)
    left = int(round((new[0] - size) / 2.0))
    top = int(round((new[1] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


class SampleDecoder:
    """Raw sample -> {batch key: uint8 image tensor (S, S, 3) or metadata value}.

    `kind` names the image keys to decode (`schema.KIND_IMAGES`); pairs drawn from training
    groups are triplets. Images stay uint8 through `collate` and the DataLoader's transfer
    between processes, and `normalise_batch` converts whole batches at the end. With `errors`,
    an undecodable sample is warned about, counted and returned as None; without, the error
    propagates.
    """

    def __init__(self, kind: str, image_size: int, augment: bool = False,
                 errors: StreamErrors | None = None):
        self.kind = kind
        self.images = {key: schema.BATCH_IMAGE_KEYS[key] for key in schema.KIND_IMAGES[kind]}
        self.image_size = image_size
        self.errors = errors
        self.augment = None
        if augment:
            # deferred: importing torchvision loads torch._dynamo, about 1.8 s of every worker's
            # start-up, and only augmentation needs it here
            from torchvision import transforms

            # Mild crops keep the modified object in view; flips are fine for real photos.
            self.augment = transforms.Compose([
                transforms.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True),
                transforms.RandomHorizontalFlip(),
            ])

    def __call__(self, sample: dict) -> dict | None:
        try:
            meta = sample[schema.META]
            # Pairs drawn from a group carry their metadata as a dict already.
            out = dict(meta) if isinstance(meta, dict) else json.loads(meta)
            for key, name in self.images.items():
                out[name] = self.pixels(open_image(sample, key))
            return out
        except Exception as exc:
            if self.errors is None:
                raise
            self.errors.add_sample()
            log.warning("skipping undecodable %s sample %s in %s: %s: %s", self.kind,
                        sample.get("__key__"), sample.get("__url__"), type(exc).__name__, exc)
            return None

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> uint8 tensor (S, S, 3): augmented, or short side + centre crop."""
        if self.augment is not None:
            image = self.augment(image)
        else:
            image = resize_center_crop(image, self.image_size)
        return torch.from_numpy(np.array(image, dtype=np.uint8))


def open_image(sample: dict, key: str) -> Image.Image:
    for ext in schema.IMAGE_EXTS:
        data = sample.get(f"{key}.{ext}")
        if data is not None:
            return Image.open(io.BytesIO(data)).convert("RGB")
    raise KeyError(f"no {key}.{{{','.join(schema.IMAGE_EXTS)}}} image")


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


def collate(samples: list[dict]) -> dict:
    """Decoded samples -> batch: uint8 images stacked to (B, S, S, 3), other fields as lists."""
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def normalise_batch(batch: dict) -> dict:
    """Collated batch -> the same with every image as float32 (B, 3, S, S), normalised."""
    return {k: normalise(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
