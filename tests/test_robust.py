"""Bad files at scale on a real ADE20K layout with a broken file: skipping it deterministically with one log line,
finding it up front with check_files, and removing it with Without."""

from __future__ import annotations

import pickle
import shutil

import pytest

from d2i_jax.data import keys
from d2i_jax.data.ade20k import Ade20k
from d2i_jax.data.files import DatasetFileError
from d2i_jax.data.robust import SkipBadFiles, Without, check_files
from tests.dataset_layouts import truncate, write_ade20k

N = 4


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    write_ade20k(root, {"training": [(6, 8)] * N})
    return root


def broken(clean, tmp_path, bad: dict[int, str]) -> Ade20k:
    """A copy of the layout with annotation k damaged as `bad[k]` ("truncated" or "deleted" after listing)."""
    root = shutil.copytree(clean, tmp_path / "ade")
    source = Ade20k(root, "training", size=(4, 4))
    for k, damage in bad.items():
        truncate(source.annotations[k]) if damage == "truncated" else source.annotations[k].unlink()
    return source


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_skip_replaces_by_the_next_readable_index_and_logs_once(clean, tmp_path, damage):
    source = broken(clean, tmp_path, {1: damage})
    logs: list[str] = []
    skipping = SkipBadFiles(source, "skip", log=logs.append)
    assert [skipping[i][keys.ID] for i in range(N)] == [0, 2, 2, 3]
    assert skipping[1][keys.ID] == 2  # again: same replacement, no second log line
    path = str(source.annotations[1])
    assert len(logs) == 1 and path in logs[0] and "example 1" in logs[0]
    assert list(skipping.skipped) == [path] and path in skipping.skipped[path]
    assert len(skipping) == N and skipping.fingerprint() == source.fingerprint()


def test_skip_wraps_around_and_survives_pickling(clean, tmp_path, capsys):
    source = broken(clean, tmp_path, {3: "truncated"})
    skipping = SkipBadFiles(source, "skip")  # logs with print
    assert skipping[3][keys.ID] == 0
    assert str(source.annotations[3]) in capsys.readouterr().out
    restored = pickle.loads(pickle.dumps(skipping))
    assert restored.skipped == skipping.skipped and restored[3][keys.ID] == 0


def test_raise_reraises_unchanged(clean, tmp_path):
    source = broken(clean, tmp_path, {1: "truncated"})
    with pytest.raises(DatasetFileError) as direct:
        source[1]
    with pytest.raises(DatasetFileError) as wrapped:
        SkipBadFiles(source)[1]
    assert str(wrapped.value) == str(direct.value) and wrapped.value.path == str(source.annotations[1])
    assert pickle.loads(pickle.dumps(wrapped.value)).path == wrapped.value.path
    with pytest.raises(ValueError, match="on_bad_file"):
        SkipBadFiles(source, "ignore")


def test_all_bad_raises(clean, tmp_path):
    source = broken(clean, tmp_path, dict.fromkeys(range(N), "truncated"))
    with pytest.raises(DatasetFileError, match=f"all {N} are bad"):
        SkipBadFiles(source, "skip", log=lambda line: None)[0]


def test_check_files_then_without(clean, tmp_path):
    source = broken(clean, tmp_path, {2: "deleted", 0: "truncated"})
    bad = check_files(source, "ade", on_bad_file="skip")
    assert [i for i, _ in bad] == [0, 2]
    assert str(source.annotations[0]) in bad[0][1] and bad[1][1].startswith("FileNotFoundError")
    with pytest.raises(DatasetFileError, match=r"2 of 4 examples .* cannot be read(.|\n)*ADE_train_00000001\.png"):
        check_files(source, "ade")
    kept = Without(source, [i for i, _ in bad])
    assert len(kept) == 2 and [kept[i][keys.ID] for i in range(2)] == [1, 3]
    assert check_files(kept, "ade") == []
    assert kept.fingerprint() == Without(source, [2, 0, 2]).fingerprint() != Without(source, [0]).fingerprint()
    with pytest.raises(IndexError, match="out of range"):
        Without(source, [N])
