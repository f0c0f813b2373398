"""tokprune.fsutil: atomic writes, output checks before work, directory swap (``--out .`` too), the lock."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tokprune import fsutil
from tokprune.errors import ConfigError
from tokprune.fsutil import DirLock, LockedError


def readonly_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in: chmod 0555, or /proc where root ignores modes."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if os.geteuid() == 0:  # root writes through file modes; /proc refuses new files to everyone
        return Path("/proc")
    return d


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name or p.name.startswith(".tokprune"))


# ---- atomic writes -----------------------------------------------------------------------------------
def test_atomic_write_keeps_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    target.write_text("old")
    real_open = open

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: Full(real_open(p, mode, *a, **k))
                        if "x" in mode else real_open(p, mode, *a, **k))
    with pytest.raises(OSError) as info:
        fsutil.atomic_write_json(target, {"new": 1})
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_atomic_output_interrupted_leaves_nothing(tmp_path):
    target = tmp_path / "img.png"
    with pytest.raises(KeyboardInterrupt):
        with fsutil.atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_atomic_output_keeps_the_suffix_for_format_detection(tmp_path):
    with fsutil.atomic_output(tmp_path / "x.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"png")
    assert (tmp_path / "x.png").read_bytes() == b"png" and _leftovers(tmp_path) == []


# ---- checks before work ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["directory", "no-extension", "wrong-extension", "under-a-file", "read-only"])
def test_check_output_file_refuses_with_the_flag(case, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    path = {
        "directory": tmp_path,
        "no-extension": tmp_path / "image",
        "wrong-extension": tmp_path / "image.txt",
        "under-a-file": tmp_path / "file.txt" / "a.png",
        "read-only": readonly_dir(tmp_path) / "a.png",
    }[case]
    with pytest.raises(ConfigError) as info:
        fsutil.check_output_file(path, flag="--out", extensions=fsutil.IMAGE_EXTENSIONS)
    msg = str(info.value)
    assert msg.startswith(f"--out {path}") and "\n" not in msg
    assert {"directory": "is a directory", "no-extension": "no extension", "wrong-extension": "'.txt'",
            "under-a-file": "is a file", "read-only": "cannot write there"}[case] in msg
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "ro") == ["file.txt"]  # nothing created


def test_check_output_file_accepts_a_new_nested_path(tmp_path):
    assert fsutil.check_output_file(tmp_path / "a" / "b" / "c.png", flag="--out", extensions=(".png",))
    assert not (tmp_path / "a").exists()  # checked, not created


@pytest.mark.parametrize("content", [b"\x00\x01\x02binary", b"\xff\xfe\xfa", b"\n# only a comment\n\n"])
def test_read_text_input_refuses_binary_and_empty_files(content, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_bytes(content)
    with pytest.raises(ConfigError, match=r"^--prompts .*prompts.txt (is not a text file|holds no prompts)"):
        fsutil.read_text_input(f, flag="--prompts", what="prompt")


# ---- directory replacement ---------------------------------------------------------------------------
def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_replace_dir_swaps_and_removes_the_old(tmp_path):
    new, target = tmp_path / ".t.partial", tmp_path / "t"
    new.mkdir()
    (new / "a").write_text("new")
    target.mkdir()
    (target / "a").write_text("old")
    fsutil.replace_dir(new, target)
    assert _tree(target) == {"a": b"new"} and sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_replace_dir_failure_puts_the_old_back(tmp_path, monkeypatch):
    new, target = tmp_path / ".t.partial", tmp_path / "t"
    new.mkdir()
    (new / "a").write_text("new")
    target.mkdir()
    (target / "a").write_text("old")
    real = os.replace

    def failing(src, dst):
        if Path(src) == new:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        fsutil.replace_dir(new, target)
    assert _tree(target) == {"a": b"old"} and _tree(new) == {"a": b"new"}


def test_replace_dir_into_the_current_directory(tmp_path, monkeypatch):
    cwd = tmp_path / "here"
    cwd.mkdir()
    (cwd / "old.onnx").write_text("old")
    new = tmp_path / ".here.partial"
    (new / "sub").mkdir(parents=True)
    (new / "sub" / "x").write_text("x")
    (new / "manifest.json").write_text("{}")
    monkeypatch.chdir(cwd)
    fsutil.replace_dir(new, Path("."))
    assert _tree(cwd) == {"manifest.json": b"{}", "sub/x": b"x"} and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


# ---- the lock ---------------------------------------------------------------------------------------------
def test_second_lock_is_refused_with_the_holder(tmp_path):
    path = tmp_path / ".out.lock"
    with DirLock(path, what="--out out", command="tokprune-export A"):
        with pytest.raises(LockedError) as info:
            DirLock(path, what="--out out").acquire()
        msg = str(info.value)
        assert f"pid {os.getpid()}" in msg and "tokprune-export A" in msg and str(path) in msg
    assert not path.exists()  # released


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / ".out.lock"
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "time": 0, "command": "x"}))
    with caplog.at_level("WARNING", logger="tokprune.fsutil"):
        with DirLock(path, what="--out out"):
            assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in caplog.text


def test_lock_of_another_host_is_respected(tmp_path):
    path = tmp_path / ".out.lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": 0, "command": ""}))
    with pytest.raises(LockedError, match="pid 1 on elsewhere"):
        DirLock(path, what="--out out").acquire()
    assert json.loads(path.read_text())["host"] == "elsewhere"  # not ours: left alone
