"""Sliding-window inference as mmseg 0.x's `EncoderDecoder.slide_inference` (VPD's ADE20K test), on the host.

An image is resized keeping its aspect ratio to fit `scale` (`keep_ratio_size`, bilinear without antialiasing), cut
into `crop`-sized windows every `stride` pixels (`slide_windows`), the windows of many images are predicted in
batches of one fixed shape, and each image's window predictions are summed into a canvas, divided by the per-pixel
window count and resized (bilinear, half-pixel, no antialiasing) back to the image's own size.

Where the resized image is smaller than the crop, mmseg decodes the smaller window as it is; a fixed-shape model
cannot, so the window is zero-padded bottom / right (0 is mid-grey in [-1, 1], the value mmseg's training `Pad` fills
crops with) and the padded part of its prediction is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from d2i_jax.data.files import keep_ratio_size, resize_linear

Window = tuple[int, int, int, int]  # (y1, y2, x1, x2) in the resized image
# (windows [n, crop_h, crop_w, 3], owners [n]: the index of each window's image) -> {name: [n, crop_h, crop_w, C]}
PredictWindows = Callable[[np.ndarray, np.ndarray], Mapping[str, np.ndarray]]


def slide_windows(size: tuple[int, int], crop: tuple[int, int], stride: tuple[int, int]) -> list[Window]:
    """The windows mmseg's `slide_inference` cuts from an image of `size` (H, W), in its order (rows, then columns):
    `grids = max(H - crop + stride - 1, 0) // stride + 1` starts per axis, every window clamped to end inside the
    image; along an axis shorter than the crop there is one window, the whole axis."""
    def starts(n: int, c: int, s: int) -> list[tuple[int, int]]:
        spans = []
        for i in range(max(n - c + s - 1, 0) // s + 1):
            end = min(i * s + c, n)
            spans.append((max(end - c, 0), end))
        return spans

    return [(y1, y2, x1, x2) for y1, y2 in starts(size[0], crop[0], stride[0])
            for x1, x2 in starts(size[1], crop[1], stride[1])]


def slide_inference(predict: PredictWindows, images: Sequence[np.ndarray], *, scale: tuple[int, int],
                    crop: tuple[int, int], stride: tuple[int, int], rows: int) -> dict[str, list[np.ndarray]]:
    """Per model name, each image's prediction `[H, W, C]` (float32) at its own size, from windows predicted `rows`
    at a time (the last call may get fewer; `predict` pads them to one shape).

    Args:
      predict: the model on a batch of windows (see `PredictWindows`).
      images: `[H, W, 3]` float images in [-1, 1], any sizes.
      scale: (long, short) bound of the keep-ratio resize (mmseg's `img_scale`, e.g. (2048, 512)).
      crop, stride: (h, w) window size (the model's input size) and step.
      rows: windows per `predict` call.
    """
    cuts = []  # (image index, window, pixels)
    for i, image in enumerate(images):
        size = keep_ratio_size(image.shape[:2], scale)
        resized = resize_linear(np.asarray(image, np.float32), size).astype(np.float32)
        for y1, y2, x1, x2 in slide_windows(size, crop, stride):
            pixels = np.zeros((*crop, resized.shape[-1]), np.float32)
            pixels[:y2 - y1, :x2 - x1] = resized[y1:y2, x1:x2]
            cuts.append((i, (y1, y2, x1, x2), pixels))
    sums: dict[str, list[np.ndarray]] = {}
    counts = [np.zeros(keep_ratio_size(image.shape[:2], scale), np.float32) for image in images]
    for i, (y1, y2, x1, x2), _ in cuts:
        counts[i][y1:y2, x1:x2] += 1
    if not all(count.all() for count in counts):  # mmseg asserts it too
        raise ValueError(f"windows of {crop} every {stride} pixels leave gaps: the stride must not exceed the crop")
    for start in range(0, len(cuts), rows):
        chunk = cuts[start:start + rows]
        out = predict(np.stack([pixels for _, _, pixels in chunk]), np.asarray([i for i, _, _ in chunk]))
        for name, preds in out.items():
            canvases = sums.setdefault(name, [np.zeros((*c.shape, preds.shape[-1]), np.float32) for c in counts])
            for (i, (y1, y2, x1, x2), _), pred in zip(chunk, np.asarray(preds, np.float32), strict=True):
                canvases[i][y1:y2, x1:x2] += pred[:y2 - y1, :x2 - x1]
    return {name: [resize_linear(canvas / count[..., None], image.shape[:2]).astype(np.float32)
                   for canvas, count, image in zip(canvases, counts, images, strict=True)]
            for name, canvases in sums.items()}
