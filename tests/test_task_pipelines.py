"""Depth, segmentation and the multi-task model through every stage (warm-up -> create -> self-improve -> evaluate)
on a micro setting: a 16-channel random SD, four procedural rooms, one DDIM step; what each stage writes, in the
task's formats."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image
from safetensors.torch import save_file

from configs import demo_depth, demo_multitask, demo_seg, pascal_mt
from d2i_jax import runner
from d2i_jax.data import keys
from d2i_jax.models.random_sd import TINY_TEXT_ENCODER, write_random_sd
from d2i_jax.training.steps import Steps
from tests import test_pascal_context, test_vit, tiny_pipeline
from tests.dataset_layouts import write_nyud_mt
from tests.gcs_emulator import upload

STAGES = ("warmup", "create", "self_improve", "evaluate")


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    text = {**TINY_TEXT_ENCODER, "hidden_size": tiny_pipeline.UNET["cross_attention_dim"], "intermediate_size": 32}
    return str(write_random_sd(tmp_path_factory.mktemp("sd"), unet=tiny_pipeline.UNET, vae=tiny_pipeline.VAE,
                               text_encoder=text))


def micro(config, sd_path):
    c = config.get_config()
    c.sd_path = sd_path
    c.stages = STAGES
    c.data.image_size = (64, 64)
    c.data.scenes.num_train, c.data.scenes.num_test, c.data.scenes.size = 4, 2, (48, 64)
    c.fusion.reduce_channels, c.fusion.deconv_channels = (16, 16, 8, 8), (8, 8)
    for section in [c.task[k] for k in c.task.tasks] if c.task.name == "multitask" else [c.task]:
        section.head.decoder_channels = (16, 8, 8, 8)
    c.train.batch_size, c.train.log_every, c.train.checkpoint_every = 4, 1, 0
    c.warmup.epochs = c.self_improve.epochs = 1
    c.self_improve.ema_every_samples = 4
    c.create.num_steps = 1
    c.create.batch_size = c.evaluate.batch_size = 4
    c.model.cache_latents = False
    return c


@pytest.mark.parametrize("config, label", [(demo_depth, "npy"), (demo_seg, "png")], ids=["depth", "segmentation"])
def test_task_runs_every_stage(config, label, sd_path, tmp_path):
    r = runner.run(micro(config, sd_path), tmp_path)
    for stage in STAGES:
        assert (tmp_path / stage / "DONE").exists(), stage
    labels = sorted((tmp_path / "create" / "label").glob(f"*.{label}"))
    assert [p.stem for p in labels] == [f"{i:06d}" for i in range(4)]
    example = r.task.read_label(labels[0], (64, 64))
    if label == "npy":  # metres, every pixel valid, plus a colour picture beside it
        assert example[keys.DEPTH].shape == (64, 64) and (example[keys.DEPTH] > 0).all()
        assert (example[keys.DEPTH] < r.task.max_depth).all()
        assert (tmp_path / "create" / "label" / "000000_color.png").exists()
    else:  # a palette PNG of class ids
        assert Image.open(labels[0]).mode == "P"
        assert example[keys.SEMSEG].max() < r.task.num_classes
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"untrained", "theta_W", "theta_C", "create"}
    fidelity = metrics.pop("create")
    for m in [*metrics.values(), fidelity["synthetic"], fidelity["real"]]:
        for key, _ in r.task.metric_columns:
            assert m[key] is not None and np.isfinite(m[key]), (key, m)
    assert (tmp_path / "evaluate" / "predictions.png").stat().st_size > 0
    assert len(list((tmp_path / "self_improve" / "model").iterdir())) > 0


def test_multitask_runs_every_stage(sd_path, tmp_path):
    """One model for segmentation, depth and normals: each synthetic room gets its three labels in their own
    formats, theta_C's labels cover every task, every task is scored, the pictures have a row per task."""
    c = micro(demo_multitask, sd_path)
    c.stages = (*STAGES, "generate")
    c.generate.num_steps, c.generate.num_samples = 1, 2
    r = runner.run(c, tmp_path)
    label_dir = tmp_path / "create" / "label"
    for key, pattern in (("semseg", "*.png"), ("depth", "*.npy"), ("normals", "*.png")):
        assert sorted(p.stem for p in (label_dir / key).glob(pattern)) == [f"{i:06d}" for i in range(4)], key
    example = r.task.read_label(r.task.label_file(label_dir, "000001"), (64, 64))
    assert set(example) == {keys.SEMSEG, keys.DEPTH, keys.NORMAL, keys.MASK}
    assert example[keys.SEMSEG].max() < 5 and (example[keys.DEPTH] > 0).all() and example[keys.MASK].all()
    np.testing.assert_allclose(np.linalg.norm(example[keys.NORMAL], axis=-1), 1.0, atol=0.02)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("untrained", "theta_W", "theta_C"):
        for key in ("semseg/miou", "depth/rmse", "normals/mean"):
            assert np.isfinite(metrics[name][key]), (name, key)
    assert metrics["theta_W"]["depth/rmse"] < metrics["untrained"]["depth/rmse"]  # it learned something
    rows = Image.open(tmp_path / "evaluate" / "predictions.png").size[1]
    assert rows > 3 * 64 * min(c.evaluate.num_pictures, 2)  # each cell stacks the three tasks
    for name in ("from_noise", "from_partial_noise"):
        assert (tmp_path / "generate" / f"{name}.png").stat().st_size > 0


def test_pascal_multitask_runs_every_stage(sd_path, tmp_path, capsys):
    """configs/pascal_mt.py on a PASCAL-Context fixture in its real formats (a person-free image among them):
    segmentation, human parts, saliency and normals trained, created, self-improved and scored."""
    test_pascal_context.write_layout(tmp_path / "pascal")
    c = micro(pascal_mt, sd_path)
    c.data.root = str(tmp_path / "pascal")
    c.data.augment.crop_size = (64, 64)  # InvPT's pipeline on the stored 12 x 16 images: scaled, padded
    c.train.batch_size, c.train.schedule, c.warmup.steps = 3, "constant", 0
    c.self_improve.ema_every_samples = 3
    c.evaluate.batch_size = 1
    r = runner.run(c, tmp_path / "run")
    assert "3 real + 3 synthetic images (pool), 1 epochs, batch 1" in capsys.readouterr().out  # the paper's batch 1
    label_dir = tmp_path / "run" / "create" / "label"
    assert sorted(p.name for p in label_dir.iterdir()) == ["normals", "parts", "saliency", "semseg"]
    labels = r.task.read_label(r.task.label_file(label_dir, "000002"), (64, 64))
    assert set(np.unique(labels[keys.SALIENCY])) <= {0, 1} and labels[keys.PARTS].max() < 7
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for name in ("untrained", "theta_W", "theta_C"):
        m = metrics[name]
        assert 0 <= m["saliency/max_f"] <= 100 and m["parts/images"] == 0, name  # the val image has no person
        assert all(np.isfinite(m[k]) for k in ("semseg/miou", "normals/mean")), name


def test_a_run_reads_its_dataset_from_gcs(sd_path, tmp_path, gcs):
    """`data.root` on gs:// (a local GCS emulator, no network): the run reads NYUD-MT through etils.epath and
    measures what the same run measures on the local folder, to the last digit."""
    ids = {"train": ["0001", "0002", "0003", "0004"], "val": ["0005", "0006"]}
    write_nyud_mt(tmp_path / "nyud", "png", ids, size=(48, 64))
    results = {}
    for name, root in (("local", str(tmp_path / "nyud")), ("gcs", upload(tmp_path / "nyud", f"{gcs}/nyud_run"))):
        c = micro(demo_depth, sd_path)
        c.data.name, c.data.root, c.data.test_split = "nyud_mt", root, "val"
        c.stages = ("warmup", "evaluate")
        runner.run(c, tmp_path / name)
        results[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert results["gcs"] == results["local"] and np.isfinite(results["gcs"]["theta_W"]["rmse"])


def test_multitask_invpt_decoder_runs_every_stage(sd_path, tmp_path):
    """Decoder (b): InvPT's ViT (weights from a timm-layout checkpoint of another size) + decoder with the SD features
    added, through every stage; the untrained model is InvPT alone (the SD projections start at zero)."""
    ref = test_vit.reference_vit("restated", (32, 32), seed=3)
    save_file(test_vit.torch_state(ref), tmp_path / "vit.safetensors")
    c = micro(demo_multitask, sd_path)
    c.model.features = "invpt"
    c.model.vit_checkpoint = str(tmp_path / "vit.safetensors")
    c.task.decoder = "invpt"
    c.task.invpt = ml_collections.ConfigDict({"vit": {**test_vit.TINY, "out_blocks": test_vit.OUT_BLOCKS},
                                              "decoder": {"embed_dim": 16, "pred_channels": 8}})
    c.create.label_pass = c.generate.label_pass = "perception"
    c.self_improve.label_mode = "eval"
    r = runner.run(c, tmp_path / "run")
    params, _ = r.init_model()
    vit = params["head"]["head"]["vit"]
    np.testing.assert_allclose(vit["patch_embed"]["proj"]["kernel"],
                               ref.patch_embed.proj.weight.detach().numpy().transpose(2, 3, 1, 0), rtol=1e-6)
    assert vit["pos_embed"].shape == (1, 1 + 8 * 8, 32)  # resized from the checkpoint's 4 x 4 grid
    assert all(float(jnp.abs(p["kernel"]).max()) == 0 for k, p in params["head"]["head"].items()
               if k.startswith("sd_proj"))
    for stage in STAGES:
        assert (tmp_path / "run" / stage / "DONE").exists(), stage
    assert sorted(p.name for p in (tmp_path / "run" / "create" / "label").iterdir()) == ["depth", "normals", "semseg"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for name in ("untrained", "theta_W", "theta_C"):
        assert all(np.isfinite(metrics[name][k]) for k in ("semseg/miou", "depth/rmse", "normals/mean")), name
    trained, _ = r.load_model("warmup")
    assert any(float(jnp.abs(p["kernel"]).max()) > 0 for k, p in trained["head"]["head"].items()
               if k.startswith("sd_proj"))  # the SD features were learned into the encoder

    c.model.features = "diff2in1"
    with pytest.raises(ValueError, match=r"set model\.features='invpt'"):
        runner.Run(c, tmp_path / "wrong").init_model()
    c.model.features, c.create.label_pass = "invpt", "denoise"
    with pytest.raises(ValueError, match="label_pass"):
        _ = runner.Run(c, tmp_path / "wrong2").perceiver


@pytest.mark.parametrize("config", [demo_depth, demo_seg, demo_multitask], ids=["depth", "segmentation", "multitask"])
def test_theta_c_labels_are_its_prediction_under_stop_gradient(config, sd_path, tmp_path):
    """The synthetic rows' targets are theta_C's pseudo-labels, and no gradient flows from them into theta_C."""
    c = micro(config, sd_path)
    c.self_improve.label_mode = "eval"
    r = runner.Run(c, tmp_path)
    params, stats = r.init_model()
    state = r.train_state(params, stats, optax.sgd(0.1), seed_offset=0)
    steps = Steps(r.perceiver, r.task, optax.sgd(0.1), label_mode="eval")
    source = r.source("train")
    batch = {k: jnp.stack([jnp.asarray(source[i][k]) for i in range(2)]) for k in (keys.IMAGE, *r.task.label_keys)}
    batch[keys.SYNTHETIC] = jnp.asarray([False, True])
    context = jnp.asarray(r.contexts(["", ""]))
    rng = jax.random.key(0)

    # "eval" mode: theta_C's head on theta_E's features (computed once here, so only the heads are differentiated)
    feats = jax.jit(r.perceiver.block_outputs)(state.params, r.frozen, batch[keys.IMAGE], context, rng)

    def labels_of(ema_params):
        return steps.labels(state.replace(ema_params=ema_params), r.frozen, batch, context, rng, feats)

    def predict(ema_params):
        return r.task.prediction(r.perceiver.head(ema_params, state.ema_batch_stats, feats, (64, 64), train=False)[0])

    labels = jax.jit(labels_of)(state.ema_params)
    pseudo = r.task.pseudo_labels(jax.jit(predict)(state.ema_params))
    for k in r.task.label_keys:
        np.testing.assert_array_equal(np.asarray(labels[k][0]), np.asarray(batch[k][0]))  # real: ground truth
        np.testing.assert_allclose(np.asarray(labels[k][1]), np.asarray(pseudo[k][1]), rtol=1e-5, atol=1e-5)
    key = r.task.label_keys[0]
    grads = jax.jit(jax.grad(lambda p: jnp.sum(labels_of(p)[key].astype(jnp.float32))))(state.ema_params)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))
    direct = jax.jit(jax.grad(lambda p: jnp.sum(predict(p))))(state.ema_params)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(direct))  # the gradient stop_gradient cuts
