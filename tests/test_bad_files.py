"""`data.on_bad_file` / `data.check_files` in a run: bad files are left out or skipped, named in the log and in
`metrics.jsonl`, or end the run naming the file."""

from __future__ import annotations

import json

import pytest

from configs import demo
from d2i_jax import runner
from d2i_jax.data import keys
from d2i_jax.data.files import DatasetFileError


def _run(tmp_path, **data):
    c = demo.get_config()
    c.data.scenes.num_train, c.data.scenes.num_test, c.data.scenes.size = 4, 1, (24, 32)
    c.data.image_size = (32, 32)
    for k, v in data.items():
        c.data[k] = v
    return runner.Run(c, tmp_path)


def _corrupt(r):
    r.source("train")  # renders the scenes
    bad = r.workdir / "scenes" / "train" / "img" / "000001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    r.source.cache_clear()
    return bad


def _events(r):
    r.writer.flush()
    lines = [json.loads(x) for x in (r.workdir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("event") == "bad_file"]


def test_raise_names_the_file(tmp_path):
    r = _run(tmp_path)
    bad = _corrupt(r)
    with pytest.raises(DatasetFileError, match=str(bad)):
        r.source("train")[1]


def test_check_files_leaves_bad_files_out_up_front(tmp_path, capsys):
    r = _run(tmp_path, on_bad_file="skip", check_files=True)
    bad = _corrupt(r)
    source = r.source("train")
    assert len(source) == 3 and [source[i][keys.ID] for i in range(3)] == [0, 2, 3]
    assert str(bad) in capsys.readouterr().out
    assert len(_events(r)) == 1 and str(bad) in _events(r)[0]["error"]


def test_skip_replaces_a_bad_file_found_late_and_records_it(tmp_path, capsys):
    r = _run(tmp_path, on_bad_file="skip")
    bad = _corrupt(r)
    source = r.source("train")
    assert len(source) == 4 and source[1][keys.ID] == 2  # the next readable example
    source[1]
    assert str(bad) in capsys.readouterr().out
    assert len(_events(r)) == 1  # logged once


def test_check_files_with_raise_fails_before_training(tmp_path):
    r = _run(tmp_path, check_files=True)
    bad = _corrupt(r)
    with pytest.raises(DatasetFileError, match="1 of 4 examples") as e:
        r.source("train")
    assert str(bad) in str(e.value)
