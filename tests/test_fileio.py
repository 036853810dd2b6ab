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


def test_saved_files_get_the_umask_mode_in_a_fresh_process(tmp_path):
    """safetensors >= 0.8 writes its own temp file and renames it over ours (0600): every writer must still end
    with the mode open() gives under the process's umask. Run in a subprocess with an explicit umask."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import os, stat, torch
os.umask(0o022)
from library.fileio import atomic_path, save_safetensors_atomic, write_text_atomic
from library.cache.storage import save_tensors_atomic
d = {str(tmp_path)!r}
save_safetensors_atomic({{"a": torch.zeros(2)}}, d + "/a.safetensors")
save_tensors_atomic(d + "/b.safetensors", {{"a": torch.zeros(2)}}, {{"k": "v"}})
write_text_atomic(d + "/c.txt", "x")
with atomic_path(d + "/d.pt", suffix=".pt") as t:
    torch.save({{}}, t)
for n in sorted(os.listdir(d)):
    print(n, oct(stat.S_IMODE(os.stat(os.path.join(d, n)).st_mode)))
"""
    repo = str(Path(__file__).resolve().parent.parent)
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=repo))
    assert r.returncode == 0, r.stderr
    modes = dict(line.split() for line in r.stdout.splitlines())
    assert modes == {"a.safetensors": "0o644", "b.safetensors": "0o644", "c.txt": "0o644", "d.pt": "0o644"}


def test_temp_names_are_marked_and_stale_ones_removed(tmp_path):
    import time

    from library.fileio import is_temp_file_name, remove_stale_temp_files

    seen = []
    with atomic_path(tmp_path / "w.safetensors", suffix=".safetensors") as tmp:
        seen.append(os.path.basename(tmp))
        open(tmp, "wb").close()
    assert is_temp_file_name(seen[0]) and f".tmp-{os.getpid()}-" in seen[0]

    old = time.time() - 7200
    (tmp_path / "lora.safetensors").write_bytes(b"x")
    leftovers = [".lora.safetensors.tmp-4242-abcd_123.safetensors",  # ours, from a killed run
                 ".lora.safetensors.k3j9x0qz.safetensors",           # an earlier version's name, target beside it
                 ".notes.tmp-1-abcdefgh"]                            # ours without suffix (write_text_atomic: .tmp)
    keep = [".lora.safetensors.tmp-4242-fresh123.safetensors",      # ours but recent: maybe a live writer
            ".config.abcdefgh.toml",                                 # a user's dot-file (no target "config" beside)
            "x.tmp-1-abcdefgh.safetensors",                          # not hidden: not ours
            ".profile"]
    for name in leftovers + keep:
        (tmp_path / name).write_bytes(b"partial")
        if "fresh" not in name:
            os.utime(tmp_path / name, (old, old))
    os.mkdir(tmp_path / ".dir.tmp-1-abcdefgh")  # a folder with our name pattern is not a temp file
    os.utime(tmp_path / ".dir.tmp-1-abcdefgh", (old, old))
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(os.path.basename(p) for p in removed) == sorted(leftovers)
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["lora.safetensors", "w.safetensors", ".dir.tmp-1-abcdefgh"])
    assert remove_stale_temp_files(tmp_path / "does-not-exist") == []
