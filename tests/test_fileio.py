"""library.fileio: the one atomic-write helper every writer uses."""
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from library.fileio import atomic_path, save_safetensors_atomic, write_text_atomic


def test_atomic_path_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.bin"  # the folder is created
    with atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(target.parent)
        with open(tmp, "wb") as f:
            f.write(b"new")
        assert not target.exists()  # nothing visible before the block ends
    assert target.read_bytes() == b"new"
    assert os.listdir(target.parent) == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600


def test_atomic_path_failure_keeps_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target, fsync=True) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_write_text_atomic_newlines(tmp_path):
    target = tmp_path / "a.txt"
    write_text_atomic(target, "x\ny\n")
    assert target.read_bytes() == b"x\ny\n"


def test_save_safetensors_atomic_round_trip(tmp_path):
    target = tmp_path / "w.safetensors"
    save_safetensors_atomic({"a": torch.arange(6.0).view(2, 3).t()}, target, {"k": "v"}, fsync=True)
    assert torch.equal(load_file(str(target))["a"], torch.arange(6.0).view(2, 3).t())
    assert os.listdir(tmp_path) == ["w.safetensors"]
