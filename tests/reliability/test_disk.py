"""A full or read-only disk: one line naming the path and the cause, nothing half-written left
behind, and the next run (with room again) resumes to the uninterrupted result."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest

from .conftest import snapshot, temp_files

pytestmark = [
    pytest.mark.reliability,
    # a full disk once ended in "Exception ignored ... ValueError: write to closed file" from tarfile
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]


def _complete_pairs(out):
    """Every shard tar has its sidecar and every sidecar its tar."""
    tars = {p.with_suffix("") for p in (out / "shards").glob("*/[0-9]*.tar")}
    sidecars = {p.with_suffix("") for p in (out / "shards").glob("*/[0-9]*.parquet")}
    return tars == sidecars


def test_disk_full_while_writing_shards(tmp_path, corpus, reference, rebuild, monkeypatch, capsys):
    import webdataset

    from fc_pipeline.cli import main

    write, calls = webdataset.TarWriter.write, []

    def fill_up(self, sample):
        calls.append(sample["__key__"])
        if len(calls) == 3:  # the first sample of the second shard
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, sample)

    monkeypatch.setattr(webdataset.TarWriter, "write", fill_up)
    out = tmp_path / "out"
    assert main(["build-dataset", str(corpus), "--out", str(out), "--samples-per-shard", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the models' loading bars
    assert err == f"build-dataset: cannot write {out}/shards/train/00001.tar: No space left on device"
    assert not temp_files(out) and _complete_pairs(out)
    assert [p.name for p in (out / "shards" / "train").glob("[0-9]*.tar")] == ["00000.tar"]
    monkeypatch.undo()
    rebuild(out)
    assert snapshot(out) == reference[1]


def test_disk_full_while_writing_a_table_and_a_read_only_folder(tmp_path, corpus, rebuild, monkeypatch):
    import fc_pipeline.storage as storage

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.pq, "write_table", full)
    out = tmp_path / "out"
    with pytest.raises(storage.WriteError, match=f"^cannot write {out}/images.parquet: No space left on device$"):
        rebuild(out)
    assert not temp_files(out) and not (out / "images.parquet").exists()
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(storage.tempfile, "mkstemp", read_only)
    with pytest.raises(storage.WriteError, match=f"^cannot write {out}/images.parquet: Read-only file system$"):
        rebuild(out)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 160 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk(small_tmpfs, corpus, reference, rebuild):
    from fc_pipeline.storage import WriteError

    out = small_tmpfs / "out"
    with pytest.raises(WriteError, match=f"^cannot write {out}/.+: No space left on device$"):
        rebuild(out)
    assert not temp_files(out) and _complete_pairs(out)
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)  # room again
    rebuild(out)
    assert snapshot(out) == reference[1]
