"""`d2i_jax.predict`: a saved run's model on photos of any size (Marigold's processing_res), equal to the evaluate
stage's path; the command line's outputs, bad files and exit status.

One tiny run (a 16-channel random SD; theta_W and theta_C saved by `Run.save_model` as the stages do, from the
untrained head rather than trained, which would cost a train-step compile) and one predictor shared by the tests;
every image here pads to 64 x 64, so the model compiles once.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import demo
from d2i_jax import predict, runner
from d2i_jax.data import keys
from d2i_jax.models.random_sd import TINY_TEXT_ENCODER, random_fill, write_random_sd
from d2i_jax.predict import STAGES, Predictor, find_run, padded_size, processed_size
from d2i_jax.stages import evaluate
from d2i_jax.training.steps import Steps
from tests import tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth uint8 picture (gradients and a disc), so resizing it changes it only a little."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.2, 1.0, 3)
    disc = ((y - 0.4) ** 2 + (x - 0.5) ** 2 < 0.05).astype(float)
    rgb = np.stack([a * x + 0.3 * disc, b * y, c * (1 - x * y)], -1)
    return np.clip(rgb * 255, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    text = {**TINY_TEXT_ENCODER, "hidden_size": tiny_pipeline.UNET["cross_attention_dim"], "intermediate_size": 32}
    sd = write_random_sd(tmp_path_factory.mktemp("sd"), unet=tiny_pipeline.UNET, vae=tiny_pipeline.VAE,
                         text_encoder=text)
    c = demo.get_config()
    c.sd_path = str(sd)
    c.stages = ()  # `runner.run` writes config.json as every run does; the models are saved below
    c.data.image_size = (64, 64)
    c.fusion.reduce_channels, c.fusion.deconv_channels = (16, 16, 8, 8), (8, 8)
    c.task.head.decoder_channels, c.task.head.mlp_hidden = (16, 8, 8, 8), 8
    c.evaluate.batch_size = 2
    path = tmp_path_factory.mktemp("run")
    r = runner.run(c, path)
    template = r.model_template()  # random weights drawn on the host: no init to compile
    for seed, stage in enumerate(STAGES):
        tree = random_fill(template, seed)
        r.save_model(stage, tree["params"], tree["batch_stats"])
    return path


@pytest.fixture(scope="module")
def predictor(workdir) -> Predictor:
    return Predictor.load(workdir, resize="aspect")  # Marigold's; "auto" would stretch for this run


def test_sizes_follow_marigold_and_pad_to_the_unet_multiple():
    assert processed_size((480, 640), 512) == (384, 512)
    assert processed_size((640, 480), 512) == (512, 384)
    assert processed_size((48, 80), 64) == (38, 64)  # int(48 * 0.8) = 38: truncated as resize_max_res
    assert processed_size((40, 40), 64) == (64, 64)  # small images are enlarged
    assert processed_size((3, 1000), 64) == (1, 64)  # never empty
    assert processed_size((123, 45), 0) == (123, 45)  # 0: native
    assert padded_size((38, 64), 64) == (64, 64) and padded_size((384, 512), 64) == (384, 512)
    assert padded_size((65, 1), 64) == (128, 64)


def test_auto_resize_predicts_as_the_run_evaluates():
    config = ml_collections.ConfigDict({"evaluate": {"inference": "whole"}})
    assert predict.resolve_resize("auto", config, None) == "stretch"  # as the run's training loader and evaluate stage
    assert predict.resolve_resize("auto", config, 512) == "aspect"  # a processing_res asks for Marigold's
    assert predict.resolve_resize("aspect", config, None) == "aspect"
    config.evaluate.inference = "slide"
    assert predict.resolve_resize("auto", config, None) == "aspect"
    with pytest.raises(ValueError, match="resize='stretch' resizes to the run's"):
        predict.resolve_resize("stretch", config, 512)
    with pytest.raises(ValueError, match="resize must be one of"):
        predict.resolve_resize("crop", config, None)


def test_the_workdir_gives_theta_c_and_a_stage_folder_its_own(workdir, predictor):
    assert predictor.stage == "self_improve" and predictor.multiple == 64 and predictor.processing_res == 64
    template = predictor.run.model_template()
    saved, warm = (random_fill(template, STAGES.index(stage))["params"] for stage in ("self_improve", "warmup"))
    got = jax.tree.leaves(predictor.models["model"][0])
    for g, s in zip(got, jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(g), s)
    assert any(np.abs(s - w).max() > 0 for s, w in zip(jax.tree.leaves(saved), jax.tree.leaves(warm), strict=True))
    assert find_run(workdir / "warmup" / "model") == (workdir, "warmup")
    assert find_run(workdir / "self_improve") == (workdir, "self_improve")
    assert find_run(workdir, "warmup") == (workdir, "warmup")
    with pytest.raises(ValueError, match="'warmup' model, but stage='self_improve'"):
        find_run(workdir / "warmup", "self_improve")
    with pytest.raises(FileNotFoundError, match="neither a run's workdir"):
        find_run(workdir.parent)
    with pytest.raises(FileNotFoundError, match="model not found"):
        find_run(workdir / "absent")


def test_predictions_come_back_at_each_inputs_size(predictor, tmp_path):
    wide, square = photo(48, 80), photo(40, 40, seed=1)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = predictor([wide, Image.fromarray(square), tmp_path / "wide.png", photo(56, 56, seed=2)])
    assert [p.shape for p in out] == [(48, 80, 4), (40, 40, 4), (48, 80, 4), (56, 56, 4)]
    for p in out:
        assert p.dtype == np.float32 and np.isfinite(p).all()
        np.testing.assert_allclose(np.linalg.norm(p[..., :3], axis=-1), 1.0, atol=1e-5)  # unit normals
        assert (p[..., 3] > 0).all()  # kappa
    np.testing.assert_array_equal(out[0], out[2])  # the array and its PNG file
    assert predictor.compiled_sizes == {(64, 64)}
    with pytest.raises(FileNotFoundError, match=r"absent\.png"):
        predictor([wide, tmp_path / "absent.png"])


def test_processing_res_changes_the_processed_size_not_the_output_size(predictor, monkeypatch):
    image = photo(48, 80)
    at_64 = predictor([image])[0]
    resized = []
    real = predict.resize_float
    monkeypatch.setattr(predict, "resize_float", lambda x, size: resized.append((x.shape[:2], tuple(size)))
                        or real(x, size))
    monkeypatch.setattr(predictor, "processing_res", 32)
    at_32 = predictor([image])[0]
    assert resized[0] == ((48, 80), (19, 32))  # the image into the model: longer side 32 (padded to 64 x 64)
    assert resized[1] == ((19, 32), (48, 80))  # the prediction back to the input size
    assert at_32.shape == at_64.shape == (48, 80, 4)
    assert np.abs(at_32 - at_64).max() > 1e-3  # another input: another prediction
    assert predictor.compiled_sizes == {(64, 64)}


def test_prediction_equals_the_evaluate_stages_path(predictor, monkeypatch):
    """`resize="stretch"` on a 48 x 80 image (to the run's 64 x 64, no padding) against the evaluate stage's "whole"
    inference with the "exact" protocol (jax's antialiased resizes, `Steps.predict`) on a batch of one with the run's
    seed. Tolerance 1e-4 (observed <= 1.3e-5): PIL's float resizes against jax's, a vmapped batch against a plain
    one. With the padding test, this covers the default "aspect" path piece by piece."""
    r = predictor.run
    r.config.evaluate.protocol, r.config.evaluate.batch_size = "exact", 1
    image = photo(48, 80, seed=3)
    example = {keys.IMAGE: image.astype(np.float32) / 127.5 - 1, keys.CAPTION: "",
               keys.NORMAL: np.zeros((48, 80, 3), np.float32), keys.MASK: np.zeros((48, 80), bool)}
    infer = evaluate._whole(r, Steps(r.perceiver, r.task, None), tuple(r.config.data.image_size))
    [(_, want, _)] = infer(predictor.models, [example])
    want = want["model"][0]
    monkeypatch.setattr(predictor, "resize", "stretch")
    got = predictor([image])[0]
    assert got.shape == want.shape == (48, 80, 4)
    np.testing.assert_allclose(got[..., :3], want[..., :3], atol=1e-4)  # normals
    np.testing.assert_allclose(got[..., 3], want[..., 3], rtol=1e-4)  # kappa
    monkeypatch.setattr(predictor, "resize", "aspect")
    assert np.abs(predictor([image])[0] - want).max() > 1e-2  # keeping the aspect ratio is another computation


def test_padding_reflects_at_the_bottom_and_is_cropped_off(predictor):
    """A 38 x 64 image is predicted as its bottom-reflected 64 x 64 version, then cropped (to float noise: the two
    sit in different rows of one batch, which XLA's CPU kernels may sum in another order; observed <= 1.3e-5)."""
    image = photo(38, 64, seed=4)
    padded = np.pad(image, ((0, 26), (0, 0), (0, 0)), mode="reflect")
    on_top = np.pad(image, ((26, 0), (0, 0), (0, 0)), mode="reflect")
    got, whole, top = predictor([image, padded, on_top])
    np.testing.assert_allclose(got, whole[:38], atol=1e-4)
    assert np.abs(got - top[26:]).max() > 0.1  # where the padding goes matters: the test can tell


def test_a_prediction_does_not_depend_on_its_batch_mates(predictor, monkeypatch):
    """Each image gets the noise of a batch of one (the feature pass samples the VAE posterior and noises the
    latent): the same prediction in any row of any batch, to float noise (observed <= 1.3e-5)."""
    a, b, c = photo(64, 64, seed=5), photo(40, 64, seed=6), photo(64, 50, seed=7)
    alone = predictor([a])[0]
    second = predictor([b, a, c])[1]  # batch size 2: a in the second row
    last = predictor([c, b, a])[2]  # a alone in the last batch, padded with copies of itself
    np.testing.assert_allclose(second, alone, atol=1e-4)
    np.testing.assert_allclose(last, alone, atol=1e-4)
    monkeypatch.setattr(predictor, "rng", jax.random.key(1))
    assert np.abs(predictor([a])[0] - alone).max() > 1e-2  # the noise matters, so sharing it is what keeps them equal


def test_predict_files_writes_predictions_and_pictures_and_names_bad_files(predictor, tmp_path, capsys):
    folder, out = tmp_path / "photos", tmp_path / "out"
    folder.mkdir()
    Image.fromarray(photo(48, 80)).save(folder / "a.png")
    Image.fromarray(photo(40, 40, seed=1)).save(folder / "b.JPG")
    (folder / "bad.png").write_bytes(b"not an image at all")
    buffer = io.BytesIO()
    Image.fromarray(photo(64, 64, seed=2)).save(buffer, format="PNG")
    (folder / "cut.png").write_bytes(buffer.getvalue()[:200])  # its header reads, its pixels do not
    (folder / "notes.txt").write_text("not a photo suffix: not read")
    report = predict.predict_files(predictor, [folder], out, progress=False)
    captured = capsys.readouterr()

    assert report.written == ["a", "b"]
    assert sorted(Path(path).name for path, _ in report.failed) == ["bad.png", "cut.png"]
    skipped = [line for line in captured.err.splitlines() if line.startswith("[predict] skipped")]
    assert len(skipped) == 2 and any("bad.png" in s for s in skipped) and any("cut.png" in s for s in skipped)
    assert "2 of 4 images predicted" in captured.out and "bad.png" in captured.out.splitlines()[-1]

    for name, (h, w) in {"a": (48, 80), "b": (40, 40)}.items():
        assert np.load(out / f"{name}.npy").shape == (h, w, 4)
        for picture in ("normal", "uncertainty"):
            assert np.asarray(Image.open(out / f"{name}_{picture}.png")).shape == (h, w, 3)
    np.testing.assert_array_equal(np.load(out / "a.npy"), predictor([photo(48, 80)])[0])
    assert (out / "legend.png").is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["legend.png", "a.npy", "a_normal.png", "a_uncertainty.png", "b.npy", "b_normal.png", "b_uncertainty.png"])


def test_cli_fails_only_when_nothing_was_predicted(workdir, tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 broken")
    status = predict.cli(str(workdir), [str(tmp_path / "bad.jpg"), str(tmp_path / "gone.png")], str(tmp_path / "o"),
                         stage="warmup", progress=False)
    captured = capsys.readouterr()
    assert status == 1
    assert "[predict] warmup model of" in captured.out and "0 of 2 images predicted" in captured.out
    assert "stretched to (64, 64)" in captured.out  # "auto": as the run's evaluate stage
    assert "bad.jpg" in captured.err and "gone.png" in captured.err


def test_command_line_user_error_is_one_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "d2i_jax.predict", "--model", str(tmp_path / "nope"), "--images",
                             str(tmp_path), "--out", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 2, result.stderr
    assert lines[0] == f"error: FileNotFoundError: model not found: {tmp_path / 'nope'}"


def test_output_names_and_upright_photos(tmp_path):
    assert predict.output_names([Path("x/a.png"), Path("y/a.jpg"), Path("b.png"), Path("z/a.png")]) == ["a", "a_2", "b",
                                                                                                  "a_3"]
    im = Image.fromarray(photo(30, 50))
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    im.save(tmp_path / "turned.jpg", exif=exif)
    assert predict.input_size(tmp_path / "turned.jpg") == (50, 30)
    assert predict.read_rgb(tmp_path / "turned.jpg").shape == (50, 30, 3)
    assert predict.read_rgb(np.zeros((5, 7), np.uint8)).shape == (5, 7, 3)
    with pytest.raises(ValueError, match="image 3: expected a uint8"):
        predict.read_rgb(np.zeros((5, 7, 3), np.float32), 3)
