"""Batches onto the device: the last stage of every pipeline, in the trainer's own process.

What belongs here: moving a loader's batch to the device the model runs on, normalising its
images there, and overlapping the next batch's copy with the current step. Nothing here decodes,
reads shards or knows about models.

The loader workers ship images as uint8 (B, S, S, 3) and the modifier as token ids (`Tokens`,
made by `composeae.data.stream`'s tokenise stage), so the trainer's process only copies:
- on CUDA, uint8 is a quarter of float32's bytes over PCIe; the batch is pinned and copied with
  `non_blocking=True` on a side stream while the previous step runs (`device_batches` keeps one
  batch in flight), then normalised on the GPU to float32 (B, 3, S, S) in channels-last memory
  (the layout the GPU's convolutions prefer; the values are those of `decode.normalise`);
- on CPU, `decode.normalise` does it in numpy, which keeps torch's intra-op thread pool asleep
  in a process that shares its cores with the loader workers.
A batch whose images are already float (normalised elsewhere) is only moved.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from composeae.data.decode import IMAGE_MEAN, IMAGE_STD, normalise


def _is_pixels(value: Any) -> bool:
    """uint8 images (B, S, S, 3) as the loader ships them."""
    return (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 4
            and value.shape[-1] == 3)


class _DeviceNormaliser:
    """uint8 (B, S, S, 3) on a CUDA device -> float32 (B, 3, S, S), channels-last, normalised."""

    def __init__(self, device: torch.device):
        self.mean = (torch.tensor(IMAGE_MEAN, device=device) * 255).view(1, 3, 1, 1)
        self.inv_std = (1 / (torch.tensor(IMAGE_STD, device=device) * 255)).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        # permute gives an NCHW view with channels-last strides; float() keeps them.
        images = pixels.permute(0, 3, 1, 2).float()
        return images.sub_(self.mean).mul_(self.inv_std)


def place(batch: dict[str, Any], device: torch.device,
          normaliser: _DeviceNormaliser | None = None, pin: bool = False) -> dict[str, Any]:
    """`batch` with its tensors on `device` and its uint8 images normalised (numpy on CPU,
    on the device on CUDA); lists of strings and ids stay as they are."""
    out = {}
    for key, value in batch.items():
        if _is_pixels(value) and (device.type == "cpu" or normaliser is None):
            value = normalise(value)  # float32 (B, 3, S, S) on the host
        if hasattr(value, "to") and not isinstance(value, str):
            if pin and isinstance(value, torch.Tensor):
                value = value.pin_memory()
            elif pin and hasattr(value, "_fields"):  # Tokens
                value = type(value)(*(t.pin_memory() for t in value))
            value = value.to(device, non_blocking=True)
        if normaliser is not None and _is_pixels(value):
            value = normaliser(value)
        out[key] = value
    return out


def device_batches(batches: Iterable[dict[str, Any]], device: torch.device) -> Iterator[dict]:
    """`batches` placed on `device`: on CUDA, the next batch is pinned, copied and normalised on
    a side stream while the caller works on the current one; elsewhere one at a time."""
    if device.type != "cuda":
        for batch in batches:
            yield place(batch, device)
        return
    normaliser = _DeviceNormaliser(device)
    side = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)

    def start(batch: dict[str, Any]) -> tuple[dict[str, Any], torch.cuda.Event]:
        with torch.cuda.stream(side):
            placed = place(batch, device, normaliser, pin=True)
            done = torch.cuda.Event()
            done.record(side)
        return placed, done

    pending = None
    for batch in batches:
        ready, pending = pending, start(batch)
        if ready is not None:
            yield _handover(*ready, main)
    if pending is not None:
        yield _handover(*pending, main)


def _handover(batch: dict[str, Any], done: torch.cuda.Event,
              main: torch.cuda.Stream) -> dict[str, Any]:
    """Make the main stream wait for this batch's copies only (not the next one's, queued
    behind them on the side stream), and tell the allocator the main stream uses its memory
    (so the side stream does not reuse it while the step still reads it)."""
    main.wait_event(done)
    for value in batch.values():
        for tensor in (value if isinstance(value, tuple) else (value,)):
            if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
                tensor.record_stream(main)
    return batch
