"""Writing to Google Cloud Storage (a local emulator, no network): whole-object writes, the append log that rewrites
its object, staged local writers uploaded when done, and the metric writer's logs in a `gs://` workdir."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from etils import epath

from d2i_jax import remote
from d2i_jax.data.atomic import AppendLog, write_atomically, write_npy_atomically
from d2i_jax.metric_writer import MetricWriter


@pytest.fixture
def prefix(gcs, tmp_path, monkeypatch):
    monkeypatch.setenv("D2I_CACHE", str(tmp_path / "cache"))
    return f"{gcs}/writes-{uuid.uuid4().hex[:8]}"


def test_whole_object_writes(prefix, tmp_path):
    write_atomically(f"{prefix}/a.txt", b"first")
    write_atomically(f"{prefix}/a.txt", b"second")
    assert epath.Path(f"{prefix}/a.txt").read_bytes() == b"second"
    write_npy_atomically(f"{prefix}/x.npy", np.arange(6.0).reshape(2, 3))
    with epath.Path(f"{prefix}/x.npy").open("rb") as f:
        np.testing.assert_array_equal(np.load(f), np.arange(6.0).reshape(2, 3))
    assert sorted(p.name for p in epath.Path(prefix).iterdir()) == ["a.txt", "x.npy"]  # no temporary names
    write_atomically(tmp_path / "b.txt", b"local")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("b.")] == ["b.txt"]


def test_append_log_rewrites_its_object_and_a_reopened_log_appends(prefix):
    path = epath.Path(f"{prefix}/log.jsonl")
    log = AppendLog(path, every_s=3600)
    log.write("1\n")
    log.flush()  # within every_s of opening: not uploaded yet
    assert not path.exists()
    log.write("2\n")
    log.flush(force=True)
    assert path.read_text() == "1\n2\n"
    log.write("3\n")
    log.close()
    assert path.read_text() == "1\n2\n3\n"
    again = AppendLog(path, every_s=0)  # a resumed run: the earlier lines are kept
    again.write("4\n")
    again.flush()
    assert path.read_text() == "1\n2\n3\n4\n"
    again.close()


def test_staged_writers_upload_when_done_and_not_on_error(prefix, tmp_path):
    with remote.staged(f"{prefix}/folder") as local:
        (local / "sub").mkdir(parents=True)
        (local / "sub" / "f.bin").write_bytes(b"\x00" * 10)
        (local / "g.txt").write_text("g")
    assert [str(p) for p in remote.list_files(f"{prefix}/folder")] == [f"{prefix}/folder/g.txt",
                                                                        f"{prefix}/folder/sub/f.bin"]
    with pytest.raises(RuntimeError), remote.staged(f"{prefix}/failed.bin") as local:
        local.write_bytes(b"partial")
        raise RuntimeError("the writer failed")
    assert not epath.Path(f"{prefix}/failed.bin").exists()
    assert not list((tmp_path / "cache").glob("staged-*"))  # the local copies are gone
    with remote.staged(tmp_path / "here.bin") as local:  # a local target is written in place
        assert local == tmp_path / "here.bin"


def test_metric_writer_in_a_gcs_workdir(prefix, tmp_path):
    writer = MetricWriter(prefix)
    writer.write("warmup", 1, {"loss": np.float32(0.5)})
    writer.event("data", "bad_file", source="x", error="broken")
    writer.summary({"theta_W": {"mean": 20.0, "per_class": np.array([1.0, np.nan])}})
    writer.flush()
    workdir = epath.Path(prefix)
    assert [json.loads(x)["stage"] for x in (workdir / "metrics.jsonl").read_text().splitlines()] == ["warmup",
                                                                                                       "data"]
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    uploaded = len(events[0].read_bytes())
    writer.write("warmup", 2, {"loss": 0.25})
    writer.close()
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 3
    assert len(events[0].read_bytes()) > uploaded  # step 2's scalar, uploaded at close
    assert json.loads((workdir / "metrics.json").read_text()) == {"theta_W": {"mean": 20.0,
                                                                              "per_class": [1.0, None]}}
    assert not list((tmp_path / "cache").glob("tensorboard-*"))  # the local event files are removed
