"""Sliding-window inference (`d2i_jax.training.slide`) against mmseg 0.x's `slide_inference` and mmcv's rescale."""

from __future__ import annotations

import numpy as np
import pytest

from d2i_jax.data.files import keep_ratio_size, resize_linear
from d2i_jax.training.slide import slide_inference, slide_windows


def mmseg_windows(h_img, w_img, crop, stride):
    """mmseg 0.x `EncoderDecoder.slide_inference`'s loop, restated."""
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    out = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            out.append((y1, y2, x1, x2))
    return out


def test_windows_are_mmseg_slide_inference_windows():
    rng = np.random.default_rng(0)
    cases = [((512, 683), (512, 512), (341, 341)), ((512, 2048), (512, 512), (341, 341)),
             ((455, 2048), (512, 512), (341, 341)), ((300, 400), (512, 512), (341, 341)),
             ((512, 512), (512, 512), (341, 341)), ((853, 512), (512, 512), (341, 341))]
    cases += [(tuple(rng.integers(1, 200, 2)), tuple(rng.integers(1, 60, 2)), tuple(rng.integers(1, 60, 2)))
              for _ in range(300)]
    for size, crop, stride in cases:
        assert slide_windows(size, crop, stride) == mmseg_windows(*size, crop, stride), (size, crop, stride)
    assert slide_windows((512, 683), (512, 512), (341, 341)) == [(0, 512, 0, 512), (0, 512, 171, 683)]


def test_keep_ratio_size_is_mmcv_rescale_size():
    def mmcv(w, h, scale):  # mmcv 1.x `rescale_size((w, h), scale)` with `_scale_size`
        factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
        return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)

    rng = np.random.default_rng(1)
    for h, w in rng.integers(16, 3000, (500, 2)):
        new_w, new_h = mmcv(int(w), int(h), (2048, 512))
        assert keep_ratio_size((int(h), int(w)), (2048, 512)) == (new_h, new_w)
    assert keep_ratio_size((512, 683), (2048, 512)) == (512, 683)  # ADE20K's usual size is kept
    assert keep_ratio_size((256, 341), (2048, 512)) == (512, 682)  # short side to 512
    assert keep_ratio_size((300, 1500), (2048, 512)) == (410, 2048)  # long side bounded by 2048


def coordinates(h, w):
    """float image whose channels are (row, column, 0) of each pixel."""
    y, x = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    return np.stack([y, x, np.zeros_like(y)], -1)


@pytest.mark.parametrize("size", [(20, 45), (9, 70), (32, 32), (47, 20)])
def test_stitched_windows_at_unchanged_scale(size):
    """scale chosen so the keep-ratio resize is the identity: the fake model outputs the pixels' absolute
    coordinates (the image), their coordinates within the window and the window's image; the stitched result is
    exactly the image, the mean window-local coordinate over the windows covering each pixel, the image index."""
    crop, stride, rows = (16, 16), (11, 11), 3
    images = [coordinates(*size), coordinates(*size)[::-1].copy()]
    scale = (max(size), min(size))
    assert keep_ratio_size(size, scale) == size
    calls = []

    def predict(windows, owners):
        calls.append(len(windows))
        assert windows.shape[1:] == (*crop, 3) and len(windows) <= rows
        local = np.broadcast_to(coordinates(*crop)[..., :2], (len(windows), *crop, 2))
        owner = np.broadcast_to(owners[:, None, None, None].astype(np.float32), (len(windows), *crop, 1))
        return {"a": np.concatenate([windows[..., :2], local, owner], -1), "b": windows}

    out = slide_inference(predict, images, scale=scale, crop=crop, stride=stride, rows=rows)
    windows = slide_windows(size, crop, stride)
    assert sum(calls) == 2 * len(windows) and all(n == rows for n in calls[:-1])
    local_sum, count = np.zeros((*size, 2)), np.zeros(size)
    for y1, y2, x1, x2 in windows:
        local_sum[y1:y2, x1:x2] += coordinates(y2 - y1, x2 - x1)[..., :2]
        count[y1:y2, x1:x2] += 1
    for i, image in enumerate(images):
        a = out["a"][i]
        assert a.shape == (*size, 5) and a.dtype == np.float32
        np.testing.assert_array_equal(a[..., :2], image[..., :2])
        np.testing.assert_allclose(a[..., 2:4], local_sum / count[..., None], rtol=1e-6)
        np.testing.assert_array_equal(a[..., 4], i)
        np.testing.assert_array_equal(out["b"][i], image)


def test_resizes_to_the_scale_and_back():
    """A pointwise fake model: the result is the image resized to fit `scale` and back to its size (bilinear,
    half-pixel, no antialiasing), including an image smaller than the window after resizing (zero-padded window)."""
    rng = np.random.default_rng(2)
    images = [rng.uniform(-1, 1, size).astype(np.float32) for size in ((30, 41, 3), (10, 50, 3), (64, 20, 3))]
    scale = (64, 16)
    out = slide_inference(lambda w, _: {"m": 2 * w}, images, scale=scale, crop=(16, 16), stride=(11, 11), rows=4)
    assert keep_ratio_size((10, 50), scale) == (13, 64)  # shorter than the crop: padded window
    for image, pred in zip(images, out["m"], strict=True):
        expected = resize_linear(2 * resize_linear(image, keep_ratio_size(image.shape[:2], scale)), image.shape[:2])
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred, expected, atol=1e-5)


def test_a_stride_past_the_crop_is_an_error():
    with pytest.raises(ValueError, match="leave gaps"):
        slide_inference(lambda w, _: {"m": w}, [np.zeros((16, 40, 3), np.float32)], scale=(40, 16), crop=(16, 16),
                        stride=(16, 20), rows=2)
