"""The caption tool (`d2i_jax.captions`) with a tiny random BLIP captioner built offline: captions land where the
readers read them, equal the model's own greedy captions, unreadable images are skipped, and a rerun writes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
)

from d2i_jax import captions
from d2i_jax.data import keys
from d2i_jax.data.nyu import NyuNormals
from d2i_jax.data.nyud_mt import NyudMT
from d2i_jax.data.synthetic import CaptionedImages
from tests.dataset_layouts import write_nyud_mt
from tests.gcs_emulator import upload

MAX_NEW_TOKENS = 6
WORDS = "a the room with table chair wall floor lamp red blue green of in on and bed sofa window door".split()


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> tuple[Path, BlipForConditionalGeneration, BlipProcessor]:
    """(folder, model, processor) of a tiny random BLIP captioner saved with `save_pretrained`, loaded back."""
    folder = tmp_path_factory.mktemp("blip")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]))
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                initializer_range=0.5)  # large random weights: captions that differ between images
    config = BlipConfig(
        vision_config=dict(**tiny, image_size=32, patch_size=16),
        text_config=dict(**tiny, vocab_size=6 + len(WORDS), encoder_hidden_size=16, max_position_embeddings=32,
                         pad_token_id=0, sep_token_id=3, eos_token_id=3, bos_token_id=5),
        projection_dim=16)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    model = BlipForConditionalGeneration.from_pretrained(folder / "model").eval()
    return folder / "model", model, AutoProcessor.from_pretrained(folder / "model")


def direct_caption(blip, path: Path) -> str:
    """The model's own greedy caption of one image file."""
    _, model, processor = blip
    with Image.open(path) as im:
        inputs = processor(images=im.convert("RGB"), return_tensors="pt")
    tokens = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()


def write_images(folder: Path, names: list[str], seed: int = 0) -> None:
    """Random RGB images of differing sizes (a grey one for `*_grey.*`); the format follows the suffix."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k, name in enumerate(names):
        pixels = rng.integers(0, 256, (20 + 4 * k, 28, 3), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if "_grey" in name else pixels).save(folder / name)


def test_folder(tmp_path, blip, capsys):
    img = tmp_path / "pool" / "img"
    write_images(img, ["a.png", "b.jpg", "c_grey.png", "d.jpeg"])
    (img / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    (img / "notes.md").write_text("not an image")
    args = ["--images", str(img), "--model", str(blip[0]), "--batch_size", "2", "--max_new_tokens", str(MAX_NEW_TOKENS)]

    assert captions.main(args) == 0
    out, err = capsys.readouterr()
    assert "bad.png" in err and "4 written" in out and "1 unreadable images skipped" in out
    caption_dir = tmp_path / "pool" / "caption"  # beside img/
    files = sorted(caption_dir.iterdir())
    assert [f.name for f in files] == ["a.txt", "b.txt", "c_grey.txt", "d.txt"]
    texts = {f.stem: f.read_text(encoding="utf-8") for f in files}
    for image in ["a.png", "b.jpg", "c_grey.png", "d.jpeg"]:
        expected = direct_caption(blip, img / image)
        assert isinstance(expected, str) and expected
        assert texts[Path(image).stem] == expected
    assert len(set(texts.values())) > 1  # the images' captions differ: a mix-up would show
    # the prior stage's reader (PNG images only) sees them; the unreadable one has none
    assert CaptionedImages(tmp_path / "pool").captions() == [texts["a"], "", texts["c_grey"]]

    mtimes = {f: f.stat().st_mtime_ns for f in files}
    assert captions.main(args) == 0  # resumed: only the unreadable image is left, and it still fails
    out, err = capsys.readouterr()
    assert "0 written, 4 existed already, 1 unreadable images skipped" in out and "bad.png" in err
    assert {f: f.stat().st_mtime_ns for f in sorted(caption_dir.iterdir())} == mtimes


def test_caption_images_api(tmp_path, capsys):
    write_images(tmp_path / "img", ["x.png", "y.png", "z.png"])
    images = sorted((tmp_path / "img").iterdir())
    outputs = [tmp_path / "out" / f"{p.stem}.txt" for p in images]
    batches = []

    def captioner(pixels: list[Image.Image]) -> list[str]:
        batches.append([im.size for im in pixels])
        return [f"café ☕ {im.height}" for im in pixels]

    report = captions.caption_images(images, outputs, captioner, batch_size=2, progress=False)
    assert report.written == outputs and report.existing == 0 and not report.failed
    assert batches == [[(28, 20), (28, 24)], [(28, 28)]]
    assert [o.read_text(encoding="utf-8") for o in outputs] == ["café ☕ 20", "café ☕ 24", "café ☕ 28"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.txt", "y.txt", "z.txt"]  # no temporaries

    def unused(pixels: list[Image.Image]) -> list[str]:
        raise AssertionError("nothing should be captioned")

    report = captions.caption_images(images, outputs, unused, progress=False)
    assert report.written == [] and report.existing == 3 and "(nothing to do)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="would share the caption file"):
        captions.caption_images(images[:2], [outputs[0]] * 2, unused, progress=False)


def test_nyud_mt(tmp_path, blip):
    """Every split's images captioned at `caption/<id>.txt`, as `NyudMT` reads them back; a caption there is kept."""
    root = tmp_path / "nyud"
    ids = {"train": ["1", "2"], "val": ["3"]}
    write_nyud_mt(root, "png", ids)
    (root / "caption" / "2.txt").write_text("given caption", encoding="utf-8")
    args = ["--images", str(root), "--dataset", "nyud_mt", "--model", str(blip[0]),
            "--max_new_tokens", str(MAX_NEW_TOKENS)]
    assert captions.main(args) == 0
    assert sorted(p.name for p in (root / "caption").iterdir()) == ["1.txt", "2.txt", "3.txt"]
    for split, split_ids in ids.items():
        source = NyudMT(root, split, label_keys=())
        for index, example_id in enumerate(split_ids):
            image = root / "images" / f"{example_id}.png"
            expected = "given caption" if example_id == "2" else direct_caption(blip, image)
            assert source[index][keys.CAPTION] == expected


def test_nyu(tmp_path, blip, capsys):
    """Bae's layout: `<split>/caption/<stem>.txt` beside `<split>/img/`, as `NyuNormals` reads them; a missing
    split is named and left out."""
    root = tmp_path / "nyu"
    write_images(root / "train" / "img", ["000000.png", "000001.png"])
    write_images(root / "train" / "norm", ["000000.png", "000001.png"])
    args = ["--images", str(root), "--dataset", "nyu", "--model", str(blip[0]), "--max_new_tokens", str(MAX_NEW_TOKENS)]
    assert captions.main(args) == 0
    assert "split 'test' left out" in capsys.readouterr().out
    assert sorted(p.name for p in (root / "train" / "caption").iterdir()) == ["000000.txt", "000001.txt"]
    source = NyuNormals(root, "train")
    for index in range(2):
        assert source.caption(index) == direct_caption(blip, root / "train" / "img" / f"00000{index}.png")


def test_folders_on_gcs(gcs, tmp_path, blip, monkeypatch):
    """An image folder and a dataset root on Cloud Storage (the emulator): the captions are written there, where the
    readers read them, and nothing lands in a local `gs:` folder."""
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "data"
    write_images(local / "pool" / "img", ["a.png", "b.png"])
    write_images(local / "nyu" / "train" / "img", ["000000.png"])
    write_images(local / "nyu" / "train" / "norm", ["000000.png"])
    url = upload(local, f"{gcs}/captions")
    common = ["--model", str(blip[0]), "--max_new_tokens", str(MAX_NEW_TOKENS)]
    assert captions.main(["--images", f"{url}/pool/img", *common]) == 0
    assert captions.main(["--images", f"{url}/nyu", "--dataset", "nyu", *common]) == 0
    assert CaptionedImages(f"{url}/pool").captions() == [direct_caption(blip, local / "pool" / "img" / n)
                                                         for n in ("a.png", "b.png")]
    assert NyuNormals(f"{url}/nyu", "train").caption(0) == direct_caption(blip, local / "nyu/train/img/000000.png")
    assert not (tmp_path / "gs:").exists()


@pytest.mark.parametrize("case, message", [
    ("missing_folder", "image folder not found"),
    ("unknown_dataset", "the readers that read caption files"),
    ("bad_model", "cannot load captioning model"),
])
def test_user_errors(tmp_path, capsys, case, message):
    write_images(tmp_path / "img", ["a.png"])
    (tmp_path / "not_a_model").mkdir()
    args = {
        "missing_folder": ["--images", str(tmp_path / "nope"), "--model", str(tmp_path / "not_a_model")],
        "unknown_dataset": ["--images", str(tmp_path), "--dataset", "ade20k", "--model", str(tmp_path / "not_a_model")],
        "bad_model": ["--images", str(tmp_path / "img"), "--model", str(tmp_path / "not_a_model")],
    }[case]
    assert captions.main(args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("error: ") and message in lines[0] and lines[1].startswith("(rerun with --traceback")
    assert not (tmp_path / "caption").exists()
