"""Model inputs made where the model runs: JPEG bytes and host pixels -> normalised batches on its device.

The embed stage's GPU path. Its decode tasks only read plain JPEGs (`catalog.decode.plain_jpeg`) and
decode everything else on the CPU; a model worker then turns each unit into batches here:

- plain JPEGs are decoded in batches by a `JpegDecoder` (nvJPEG through ``torchvision.io.decode_jpeg``
  on CUDA; PIL's decoder on a CPU device, so the same code runs in the tests of machines without a
  GPU) and resized and centre-cropped by `resize_crop`, the tensor form of `Preprocess.crop`;
- a file the decoder rejects is decoded by ``host_decode`` (the CPU path), so its pixels, or its
  error reason, are what the CPU path gives;
- pixels decoded on the host travel as uint8 (pinned on CUDA), a quarter of the bytes of the
  normalised floats, and are normalised on the device;
- `prefetched` prepares the next batch in a worker thread, on a side CUDA stream, while the caller
  runs the model on the current one.

Batches keep the unit's order: a batch's ``positions`` are the unit positions of its rows.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from catalog.decode import DecodeError, Preprocess, decode_rgb

log = logging.getLogger("curate.curation")

#: Decodes a batch of plain JPEGs to uint8 [3, H, W] tensors on the device; raises if any file fails.
JpegDecoder = Callable[[list[bytes]], list[Tensor]]
#: The CPU path for one encoded file: uint8 [size, size, 3] pixels, or a `DecodeError`.
HostDecode = Callable[[bytes], np.ndarray]
_TENSOR_MODES = ("bilinear", "bicubic")  # antialiased in torch as in PIL (bicubic with a = -0.5)


def nvjpeg_decoder(device: torch.device) -> JpegDecoder:
    """Batched nvJPEG decoding on ``device`` (CUDA). torchvision is imported here: it exists on GPU
    machines only (it cannot be installed beside the CPU build of torch)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(files: list[bytes]) -> list[Tensor]:
        data = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return decode


def pil_decoder(device: torch.device) -> JpegDecoder:
    """PIL's full-resolution decoding, the CPU stand-in for nvJPEG (no reduced-scale JPEG decoding)."""

    def decode(files: list[bytes]) -> list[Tensor]:
        return [torch.from_numpy(np.array(decode_rgb(f))).permute(2, 0, 1).to(device) for f in files]

    return decode


def jpeg_decoder(device: torch.device) -> JpegDecoder:
    """nvJPEG on CUDA, PIL's decoder elsewhere."""
    return nvjpeg_decoder(device) if device.type == "cuda" else pil_decoder(device)


def resize_crop(img: Tensor, pre: Preprocess) -> Tensor:
    """uint8 [3, H, W] -> float32 [3, size, size] of whole levels 0..255: `Preprocess.crop` on a tensor.

    The same output size and crop box; antialiased resampling with PIL's kernel; rounded and clipped
    like PIL's 8-bit output. Values differ from PIL's by its fixed-point arithmetic (about one level).
    """
    if pre.interpolation not in _TENSOR_MODES:
        raise ValueError(f"interpolation {pre.interpolation!r} has no tensor form; use one of {_TENSOR_MODES}")
    height, width = img.shape[-2:]
    new_w, new_h = pre.resized(int(width), int(height))
    left, top = pre.crop_origin(new_w, new_h)
    x = F.interpolate(img[None].float(), size=(new_h, new_w), mode=pre.interpolation, antialias=True,
                      align_corners=False)
    return x[0, :, top : top + pre.size, left : left + pre.size].round().clamp(0.0, 255.0)


def normalize(x: Tensor, pre: Preprocess) -> Tensor:
    """float [n, 3, size, size] levels -> the model's input: the operations of `Preprocess.normalize_batch`."""
    mean = torch.tensor(pre.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def decode_all(files: list[bytes], decoder: JpegDecoder) -> list[Tensor | None]:
    """Each file's decoded tensor, or None for a file the decoder rejects: one bad file fails a batched
    call, so a failed batch is decoded again file by file."""
    try:
        return list(decoder(files))
    except (RuntimeError, ValueError, DecodeError):
        out: list[Tensor | None] = []
        for f in files:
            try:
                out.append(decoder([f])[0])
            except (RuntimeError, ValueError, DecodeError):
                out.append(None)
        return out


@dataclass
class DeviceBatch:
    """Model inputs of some of a unit's images, in unit order."""

    positions: list[int]  # unit positions of the rows of ``x``
    x: Tensor  # [len(positions), 3, size, size] float32, normalised, on the device
    failed: dict[int, DecodeError] = field(default_factory=dict)  # positions no decoder could read
    redecoded: int = 0  # JPEGs the device decoder rejected and the host decoded


def device_batches(encoded: Sequence[bytes], host_pixels: np.ndarray, usable: Sequence[bool], pre: Preprocess,
                   decoder: JpegDecoder, host_decode: HostDecode, device: torch.device,
                   batch_size: int) -> Iterator[DeviceBatch]:
    """The usable images of a unit as batches of at most ``batch_size``, in order.

    ``encoded[i]`` holds image i's JPEG for the device decoder, or ``b""`` when the host decoded it:
    then its pixels are the next row of ``host_pixels`` (uint8 [n_host, size, size, 3], in unit order).
    """
    host_rows, row = {}, 0
    for i, ok in enumerate(usable):
        if ok and not encoded[i]:
            host_rows[i], row = row, row + 1
    if row != len(host_pixels):
        raise ValueError(f"{len(host_pixels)} host-decoded images for {row} usable images without JPEG bytes")
    todo = [i for i, ok in enumerate(usable) if ok]
    for start in range(0, len(todo), batch_size):
        yield _batch(todo[start : start + batch_size], encoded, host_pixels, host_rows, pre, decoder, host_decode,
                     device)


def _batch(positions: list[int], encoded: Sequence[bytes], host_pixels: np.ndarray, host_rows: dict[int, int],
           pre: Preprocess, decoder: JpegDecoder, host_decode: HostDecode, device: torch.device) -> DeviceBatch:
    on_device = [i for i in positions if encoded[i]]
    decoded = dict(zip(on_device, decode_all([encoded[i] for i in on_device], decoder)))
    failed: dict[int, DecodeError] = {}
    extra: dict[int, np.ndarray] = {}  # JPEGs the device decoder rejected, decoded by the host
    for i in (i for i, t in decoded.items() if t is None):
        try:
            extra[i] = host_decode(encoded[i])
        except DecodeError as e:
            failed[i] = e
    kept = [i for i in positions if i not in failed]
    device_rows = [i for i in kept if decoded.get(i) is not None]
    host = [i for i in kept if decoded.get(i) is None]
    x = torch.empty(len(kept), 3, pre.size, pre.size, dtype=torch.float32, device=device)
    slot = {i: k for k, i in enumerate(kept)}
    if device_rows:
        crops = torch.stack([resize_crop(decoded[i], pre) for i in device_rows])
        x[[slot[i] for i in device_rows]] = crops
    if host:
        pixels = np.stack([extra[i] if i in extra else host_pixels[host_rows[i]] for i in host])
        x[[slot[i] for i in host]] = _to_device(pixels, device).permute(0, 3, 1, 2).float()
    return DeviceBatch(kept, normalize(x, pre), failed, len(extra))


def _to_device(pixels: np.ndarray, device: torch.device) -> Tensor:
    """uint8 host pixels onto the device: from pinned memory on CUDA, so the copy does not block the host."""
    t = torch.from_numpy(np.ascontiguousarray(pixels))
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_END = object()


def prefetched(batches: Iterable[DeviceBatch], device: torch.device, depth: int = 2) -> Iterator[DeviceBatch]:
    """``batches`` in order, each made in a worker thread while the caller uses the one before.

    On CUDA the thread works on a side stream and records an event per batch; the caller's stream waits
    for that event before using the batch, whose memory is then also recorded on the caller's stream.
    An error in the thread is raised here; stopping early stops the thread.
    """
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            with torch.inference_mode(), torch.cuda.stream(side) if side is not None else nullcontext():
                for batch in batches:
                    event = torch.cuda.Event() if side is not None else None
                    if event is not None:
                        event.record(side)
                    if not put((batch, event)):
                        return
            put(_END)
        except BaseException as e:  # handed to the caller, which raises it
            put(e)

    thread = threading.Thread(target=work, name="curate-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            batch, event = item
            if event is not None:
                stream = torch.cuda.current_stream(device)
                stream.wait_event(event)
                batch.x.record_stream(stream)
            yield batch
    finally:
        stop.set()
        thread.join()
