"""TFDS `array_record` datasets (`d2i_jax.data.tfds_builder` / `tfds_source` / `tfds_build`): built from tiny datasets
in every on-disk format the project reads, each example read back through `config.data.source = "tfds"` equals the
folder reader's (every key, dtype, shape and value) at the size on disk and resized, in both resize modes; the
errors name the missing dataset / split / setting; and a build plus a tiny training run work where TensorFlow cannot
be imported."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
import uuid
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from configs import demo, genpercept_depth, genpercept_normals, nyu
from d2i_jax.data import check_files, get_source, keys, make_loader
from d2i_jax.data.scenes import write_nyu_layout
from d2i_jax.data.tfds_build import build, used_datasets
from tests import test_pascal_context
from tests.dataset_layouts import write_ade20k, write_nyud_mt
from tests.marigold_layouts import write_hypersim, write_kitti, write_nyu, write_vkitti

REPO = Path(__file__).resolve().parent.parent
NYU_LABELS = (keys.NORMAL, keys.MASK, keys.DEPTH, keys.SEMSEG)
SIZES = (None, (10, 13), (37, 45))  # native, down and up (where PIL's nearest and `resize_nearest` differ)


def nyu_layout(root: Path) -> dict:
    write_nyu_layout(root, 3, 2, size=(24, 32))
    (root / "train" / "caption" / "000001.txt").unlink()  # takes the fallback caption
    return {"name": "nyu", "root": str(root), "fallback_caption": "a room"}


def scenes_layout(root: Path) -> dict:  # rendered by the builder into its workdir (`root`)
    return {"name": "scenes", "scenes": {"num_train": 3, "num_test": 2, "size": (24, 32), "seed": 0,
                                         "held_out": "test"}}


def nyud_mt_layout(variant: str):
    def write(root: Path) -> dict:
        write_nyud_mt(root, variant, {"train": ["0003", "0007", "0011"], "val": ["0001", "0005"]})
        (root / "caption" / "0007.txt").write_text("a bedroom\n")
        return {"name": "nyud_mt", "root": str(root), "test_split": "val"}

    return write


def pascal_layout(root: Path) -> dict:
    test_pascal_context.write_layout(root)
    return {"name": "pascal_context", "root": str(root), "test_split": "val"}


def ade20k_layout(root: Path) -> dict:
    write_ade20k(root, {"training": [(12, 16), (10, 14)], "validation": [(9, 11)]})
    return {"name": "ade20k", "root": str(root), "train_split": "training", "test_split": "validation"}


def hypersim_layout(root: Path) -> dict:
    write_hypersim(root, "train", ["ai_001_001/0000", "ai_001_001/0001", "ai_002_004/0007"])
    write_hypersim(root, "val", ["ai_003_001/0002"], seed=1)
    return {"name": "hypersim", "root": str(root), "test_split": "val"}


def nyu_marigold_layout(root: Path) -> dict:  # the eigen crop: depth 0 outside it
    write_nyu(root, {"train": ["office_0003/0003"], "test": ["kitchen_0004/0001", "office_0005/0009"]})
    return {"name": "nyu_marigold", "root": str(root)}


def vkitti_layout(root: Path) -> dict:  # the KITTI benchmark crop of 375 x 1242 frames
    write_vkitti(root, {"train": ["Scene02/00000"], "val": ["Scene01/00000"]})
    return {"name": "vkitti", "root": str(root), "test_split": "val"}


def kitti_layout(root: Path) -> dict:  # frames of different sizes, one without ground truth (left out)
    frames = [("2011_09_26/2011_09_26_drive_0002_sync/0000000005", (375, 1242), True),
              ("2011_09_26/2011_09_26_drive_0002_sync/0000000006", (370, 1224), False),
              ("2011_09_28/2011_09_28_drive_0001_sync/0000000011", (370, 1224), True)]
    write_kitti(root, "val", frames[:1])
    write_kitti(root, "test", frames, seed=1)
    return {"name": "kitti_marigold", "root": str(root), "train_split": "val"}


FORMATS = {  # id -> (layout writer, the labels its reader offers)
    "nyu": (nyu_layout, NYU_LABELS),
    "scenes": (scenes_layout, NYU_LABELS),
    "nyud_mt_png": (nyud_mt_layout("png"), (keys.NORMAL, keys.MASK, keys.DEPTH, keys.SEMSEG)),
    "nyud_mt_jpg": (nyud_mt_layout("jpg"), (keys.NORMAL, keys.MASK, keys.DEPTH, keys.SEMSEG)),
    "pascal_context": (pascal_layout, (keys.NORMAL, keys.MASK, keys.SEMSEG, keys.PARTS, keys.SALIENCY)),
    "ade20k": (ade20k_layout, (keys.SEMSEG,)),
    "hypersim": (hypersim_layout, (keys.DEPTH,)),
    "nyu_marigold": (nyu_marigold_layout, (keys.DEPTH,)),
    "vkitti": (vkitti_layout, (keys.DEPTH,)),
    "kitti_marigold": (kitti_layout, (keys.DEPTH,)),
}


def config_of(data: dict) -> ml_collections.ConfigDict:
    c = nyu.get_config()
    c.data.update(data)
    return c


def with_data(data: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
    out = data.copy_and_resolve_references()
    out.update(changes)
    return out


@pytest.fixture(scope="module", params=sorted(FORMATS))
def built(request, tmp_path_factory):
    """(config, workdir, TFDS data dir, labels) of a tiny dataset of one format, built."""
    write, labels = FORMATS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    config = config_of(write(root / "data"))
    out = root / "tfds"
    build(config, out, workdir=root / "data")
    return config, root / "data", out, labels


def assert_same(folder: dict, tfds: dict, where: str) -> None:
    assert folder.keys() == tfds.keys(), where
    for key, a in folder.items():
        b = tfds[key]
        if isinstance(a, str):
            assert isinstance(b, str) and a == b, (where, key)
        else:
            a, b = np.asarray(a), np.asarray(b)
            assert (a.dtype, a.shape) == (b.dtype, b.shape), (where, key, a.dtype, b.dtype, a.shape, b.shape)
            np.testing.assert_array_equal(a, b, err_msg=f"{where} {key}")


@pytest.mark.parametrize("resize", ["public", "pil"])
def test_examples_equal_the_folder_readers(built, resize):
    config, workdir, out, labels = built
    data = with_data(config.data, resize=resize)
    splits = used_datasets(config)[data.name][1]
    assert splits == [data.train_split, data.test_split]
    for split in splits:
        for size in SIZES:
            folder = get_source(data, split, size=size, label_keys=labels, workdir=workdir)
            tfds = get_source(with_data(data, source="tfds", tfds_dir=str(out)), split, size=size, label_keys=labels,
                              workdir="unused")
            assert len(tfds) == len(folder) > 0 and tfds.source.label_keys == labels
            for i in range(len(folder)):
                assert_same(folder[i], tfds[i], f"{data.name}/{split}[{i}] at {size}, {resize}")


def test_a_source_for_the_pipeline(built):
    config, _, out, labels = built
    data = with_data(config.data, source="tfds", tfds_dir=str(out))
    small, native = (get_source(data, data.train_split, size=size, label_keys=labels, workdir="unused")
                     for size in ((10, 13), None))
    assert small.fingerprint() != native.fingerprint()
    assert small.fingerprint() == get_source(data, data.train_split, size=(10, 13), label_keys=labels,
                                             workdir="unused").fingerprint()
    again = pickle.loads(pickle.dumps(small))  # grain's worker processes get the source pickled
    assert_same(small[len(small) - 1], again[len(small) - 1], "pickled")
    assert check_files(small) == []
    batch = next(make_loader(small, batch_size=len(small), seed=3))
    assert batch[keys.IMAGE].shape == (len(small), 10, 13, 3)
    assert set(batch) == {keys.IMAGE, keys.ID, keys.CAPTION, *labels}


@pytest.mark.parametrize("built", ["nyud_mt_png"], indirect=True)
def test_worker_processes_read_it_too(built):
    config, _, out, labels = built
    data = with_data(config.data, source="tfds", tfds_dir=str(out))
    source = get_source(data, "train", size=(10, 13), label_keys=labels, workdir="unused")
    threads, workers = (list(make_loader(source, batch_size=1, seed=2, worker_count=n)) for n in (0, 1))
    assert len(threads) == len(workers) == 3
    for a, b in zip(threads, workers, strict=True):
        assert_same(a, b, "worker process")


@pytest.mark.parametrize("built", ["nyud_mt_png"], indirect=True)
def test_errors_name_what_is_missing(built, tmp_path):
    config, _, out, labels = built
    data = with_data(config.data, source="tfds", tfds_dir=str(out))

    def read(data=data, split="train", label_keys=labels):
        return get_source(data, split, size=None, label_keys=label_keys, workdir="unused")

    with pytest.raises(FileNotFoundError, match=rf"no TFDS dataset 'nyud_mt' under {tmp_path}.*tfds_build"):
        read(with_data(data, tfds_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"has splits \['train', 'val'\], not 'test'"):
        read(split="test")
    with pytest.raises(ValueError, match=r"built with other config.data settings: fallback_caption='' \(now 'x'\)"):
        read(with_data(data, fallback_caption="x"))
    with pytest.raises(ValueError, match=r"asks for \['parts'\]"):
        read(label_keys=(keys.PARTS,))
    with pytest.raises(ValueError, match="tfds_dir is empty"):
        read(with_data(data, tfds_dir=""))
    with pytest.raises(ValueError, match=r"config\.data\.source must be one of"):
        read(with_data(data, source="tfrecord"))
    # read-time settings may differ: where the files were, the resolution, the splits trained on
    assert len(read(with_data(data, root="/nowhere", image_size=(8, 8), train_split="val"))) == 3


@pytest.mark.parametrize("built", ["nyud_mt_png"], indirect=True)
def test_build_keeps_or_overwrites(built, tmp_path):
    config, _, out, labels = built
    data = with_data(config.data, source="tfds", tfds_dir=str(out))
    before = get_source(data, "train", size=None, label_keys=labels, workdir="unused").fingerprint()
    build(config, out)  # kept: nothing written
    assert get_source(data, "train", size=None, label_keys=labels, workdir="unused").fingerprint() == before
    with pytest.raises(ValueError, match=r"built without the splits \['test'\].*--overwrite"):
        build(config_of({**config.data.to_dict(), "test_split": "test"}), out)
    time.sleep(0.01)  # a new modification time
    build(config, out, overwrite=True)
    assert get_source(data, "train", size=None, label_keys=labels, workdir="unused").fingerprint() != before


@pytest.mark.parametrize("built", ["nyud_mt_png"], indirect=True)
def test_a_gcs_data_dir(built, gcs, tmp_path, monkeypatch, capsys):
    """`--out` and `data.tfds_dir` as gs:// URLs (the emulator): built locally and uploaded, kept on a second build,
    read from a local copy; the folder reader's examples."""
    monkeypatch.setenv("D2I_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would land here as ./gs:/...
    config, workdir, _, labels = built
    out = f"{gcs}/tfds-{uuid.uuid4().hex[:8]}"
    build(config, out, workdir=workdir)
    build(config, out, workdir=workdir)
    assert capsys.readouterr().out.count("[tfds] building") == 1
    data = with_data(config.data, source="tfds", tfds_dir=out)
    for split in used_datasets(config)[data.name][1]:
        folder = get_source(config.data, split, size=(10, 13), label_keys=labels, workdir=workdir)
        remote = get_source(data, split, size=(10, 13), label_keys=labels, workdir="unused")
        assert len(remote) == len(folder) > 0
        for i in range(len(folder)):
            assert_same(folder[i], remote[i], f"gs:// {split}[{i}]")
    assert not (tmp_path / "gs:").exists()


def test_the_datasets_a_config_reads():
    def names(config):
        return {name: splits for name, (_, splits) in used_datasets(config).items()}

    assert names(genpercept_depth.get_config()) == {"hypersim": ["train"], "vkitti": ["train"],
                                                    "nyu_marigold": ["test"]}
    assert names(genpercept_normals.get_config()) == {"hypersim": ["train"], "nyu": ["test"]}
    assert names(demo.get_config()) == {"scenes": ["train", "test"]}  # the prior stage holds the test split out
    c = nyu.get_config()
    c.evaluate.data = {"fallback_caption": "other"}
    with pytest.raises(ValueError, match="reads dataset 'nyu' with two different settings"):
        used_datasets(c)


def test_epoch_read_time(tmp_path):
    """One epoch of a 480 x 640 NYUv2-layout dataset read at the nyu config's 512 x 512 and as stored, from its files
    and from TFDS (printed: `pytest -s`)."""
    root = write_nyu_layout(tmp_path / "nyu", 16, 1, size=(480, 640))
    config = config_of({"root": str(root)})
    build(config, tmp_path / "tfds")
    for size in ((512, 512), None):
        times = {}
        for source in ("folder", "tfds"):
            data = with_data(config.data, source=source, tfds_dir=str(tmp_path / "tfds"))
            dataset = get_source(data, "train", size=size, label_keys=NYU_LABELS, workdir="unused")
            start = time.perf_counter()
            for i in range(len(dataset)):
                dataset[i]
            times[source] = time.perf_counter() - start
        print(f"\none epoch of 16 NYUv2-layout examples (480 x 640) at {size}: "
              + ", ".join(f"{k} {v:.3f} s" for k, v in times.items()))
    stored = sum(p.stat().st_size for p in (tmp_path / "tfds").rglob("*-train.array_record*"))
    files = sum(p.stat().st_size for p in (root / "train").rglob("*") if p.is_file())
    print(f"train split: {files / 2**20:.1f} MiB of files, {stored / 2**20:.1f} MiB of array_record")


NO_TENSORFLOW = '''
import importlib.util, sys

class HideTensorflow:
    """A finder of `sys.meta_path` that finds no `tensorflow` module, installed or not (`sys.modules["tensorflow"] =
    None` would not do: TFDS takes a `tensorflow` key in sys.modules for TensorFlow loaded)."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        hidden = name.partition(".")[0] == "tensorflow"
        return None if hidden else self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):  # find_distributions, invalidate_caches, ...
        return getattr(self.finder, attr)

sys.meta_path[:] = [HideTensorflow(f) for f in sys.meta_path]
'''

NO_TENSORFLOW_RUN = NO_TENSORFLOW + '''
import json, runpy, time
from pathlib import Path
import numpy as np

tmp = Path(sys.argv[1])
scenes = ["--config.data.scenes.num_train=4", "--config.data.scenes.num_test=2", "--config.data.scenes.size=(48, 64)"]
sys.argv = ["tfds_build", "--config=configs/demo.py", f"--out={tmp / 'tfds'}", f"--workdir={tmp / 'render'}", *scenes]
start = time.perf_counter()
try:
    runpy.run_module("d2i_jax.data.tfds_build", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
build_s = time.perf_counter() - start

from configs import demo
from d2i_jax import runner
from d2i_jax.data import get_source, keys, make_loader

c = demo.get_config()
c.stages = ("warmup", "evaluate")
c.data.source, c.data.tfds_dir = "tfds", str(tmp / "tfds")
c.data.image_size = (64, 64)
c.data.scenes.num_train, c.data.scenes.num_test, c.data.scenes.size = 4, 2, (48, 64)
c.fusion.reduce_channels, c.fusion.deconv_channels = (16, 16, 8, 8), (8, 8)
c.task.head.decoder_channels, c.task.head.mlp_hidden = (16, 8, 8, 8), 8
c.train.batch_size, c.train.log_every, c.train.checkpoint_every = 4, 1, 0
c.warmup.epochs = 1
c.evaluate.batch_size, c.evaluate.num_pictures = 2, 1

source = get_source(c.data, "train", size=(64, 64), label_keys=(keys.NORMAL, keys.MASK), workdir=tmp)
loader = make_loader(source, batch_size=2, seed=1, num_epochs=None)
next(loader)
state = loader.get_state()
expected = [next(loader) for _ in range(3)]  # across an epoch boundary
resumed = make_loader(source, batch_size=2, seed=1, num_epochs=None)
resumed.set_state(state)
same = all(np.array_equal(a[k], b[k]) for a, b in zip(expected, [next(resumed) for _ in range(3)]) for k in a
           if k != keys.CAPTION)

start = time.perf_counter()
runner.run(c, tmp / "run")
run_s = time.perf_counter() - start
print(json.dumps({
    "tensorflow": [m for m in sys.modules if m.partition(".")[0] == "tensorflow"],
    "findable": importlib.util.find_spec("tensorflow") is not None,
    "tfds": "tensorflow_datasets" in sys.modules, "resumed_same": same, "build_s": build_s, "run_s": run_s,
    "rendered_by_run": (tmp / "run" / "scenes").exists(),
    "metrics": json.loads((tmp / "run" / "metrics.json").read_text()),
}))
'''


def test_build_and_train_without_tensorflow(tmp_path):
    """The CLI builds the demo's scenes and `runner.run` trains and evaluates from them, grain's iterator state
    restores to the same batches, in a process where `import tensorflow` fails."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", NO_TENSORFLOW_RUN, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nno-TensorFlow subprocess: {time.perf_counter() - start:.1f} s (build {result['build_s']:.1f} s, "
          f"warm-up + evaluation {result['run_s']:.1f} s)")
    assert result["tensorflow"] == [] and not result["findable"] and result["tfds"]
    assert result["resumed_same"] and not result["rendered_by_run"]
    assert (tmp_path / "run" / "warmup" / "DONE").exists() and (tmp_path / "run" / "evaluate" / "DONE").exists()
    assert np.isfinite(result["metrics"]["theta_W"]["mean"])
