"""Issue 11 for tokprune-export / -inspect / -build / -calibrate: bad input, interrupts, locks, tampering.

Every case asserts the exit status, a one-line message naming the flag or file, no traceback, and
that nothing was lost or left behind. Exports use hand-written schedules (no calibration) of the
offline sd3-tiny so the whole file stays within about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from tokprune.export import exporter
from tokprune.export.cli import build_main, inspect_main
from tokprune.export.cli import main as export_main

DENSE, PRUNED = "k0256-t0093", "k0064-t0093"
VOLATILE = {"created_utc", "command", "integrity"}


def one_line_error(err: str, *needles: str) -> str:
    """The last stderr line is the error; no traceback anywhere; every needle in it."""
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def export(out: Path | str, schedule: Path, *extra: str) -> int:
    return export_main(["--model", "sd3-tiny", "--schedule", str(schedule), "--out", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def schedules(tmp_path_factory) -> dict[str, Path]:
    from tokprune.models import build_tiny_pipeline

    from tests.runtime.conftest import make_schedule

    pipe = build_tiny_pipeline("sd3")
    d = tmp_path_factory.mktemp("schedules")
    return {
        "two": make_schedule(pipe, [DENSE, PRUNED, "reuse", PRUNED]).save(d / "two.json"),
        "dense": make_schedule(pipe, [DENSE] * 4).save(d / "dense.json"),
    }


@pytest.fixture(scope="module")
def baseline(schedules, tmp_path_factory) -> Path:
    """An uninterrupted export of the two-bucket schedule; while it runs, a second export into the
    same --out is refused by the lock (same host, live process)."""
    out = tmp_path_factory.mktemp("base") / "two"
    started, release = threading.Event(), threading.Event()
    real = exporter.export_bucket_onnx
    codes: list[int] = []

    def slow(*args, **kwargs):
        started.set()
        release.wait(60)
        return real(*args, **kwargs)

    exporter.export_bucket_onnx = slow
    try:
        worker = threading.Thread(target=lambda: codes.append(export(out, schedules["two"])))
        worker.start()
        assert started.wait(60)
        import io
        import sys

        err, sys.stderr = sys.stderr, io.StringIO()
        try:
            second = export(out, schedules["two"])
            message = sys.stderr.getvalue()
        finally:
            sys.stderr = err
        release.set()
        worker.join(120)
    finally:
        exporter.export_bucket_onnx = real
    assert second == 1 and "is being written by another process" in message and f"pid {os.getpid()}" in message
    assert codes == [0]
    return out


def comparable_manifest(d: Path) -> dict:
    data = json.loads((d / "manifest.json").read_text())
    for key in VOLATILE:
        data.pop(key, None)
    for b in data["buckets"]:
        b.pop("export_seconds", None)
    if isinstance(data.get("graph"), dict):  # the one dynamic-K graph: its timing is volatile too
        data["graph"].pop("export_seconds", None)
    return data


def assert_same_export(a: Path, b: Path) -> None:
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        if name != "manifest.json":
            assert ta[name] == tb[name], f"{name} differs"
    assert comparable_manifest(a) == comparable_manifest(b)


# ---- --out and --force: nothing lost ---------------------------------------------------------------
@pytest.mark.parametrize("force", [False, True])
def test_a_non_export_directory_is_never_replaced(force, schedules, tmp_path, capsys):
    out = tmp_path / "book"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "chapter1.tex").write_text("chapter")
    before = tree(out)
    assert export(out, schedules["two"], *(["--force"] if force else [])) == 2
    line = one_line_error(capsys.readouterr().err, f"--out {out}", "not a tokprune export", "notes.txt", "sub/")
    assert "pass --force" not in line
    assert tree(out) == before and entries(tmp_path) == ["book"]  # no .partial, no lock


def test_out_is_a_file(schedules, tmp_path, capsys):
    (tmp_path / "x").write_text("data")
    assert export(tmp_path / "x", schedules["two"]) == 2
    one_line_error(capsys.readouterr().err, "--out", "is a file")
    assert (tmp_path / "x").read_text() == "data" and entries(tmp_path) == ["x"]


def test_out_in_a_read_only_place(schedules, tmp_path, capsys):
    from tests.test_fsutil import readonly_dir

    out = readonly_dir(tmp_path) / "engines"
    assert export(out, schedules["two"]) == 2
    one_line_error(capsys.readouterr().err, f"--out {out}", "cannot write there")


def test_out_dot_exports_into_the_current_directory_and_force_replaces_it(schedules, tmp_path, monkeypatch, capsys):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    stale = tmp_path / ".here.lock"  # left by an export that died: taken over with a note
    stale.write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": os.uname().nodename, "time": 0, "command": "x"}))
    assert export(".", schedules["dense"]) == 0, capsys.readouterr().err
    assert "manifest.json" in entries(here) and "taking over the stale lock" in capsys.readouterr().err
    assert entries(tmp_path) == ["here"]  # no ..partial, no lock
    assert export(".", schedules["dense"], "--precision", "fp16", "--force") == 0, capsys.readouterr().err
    assert json.loads((here / "manifest.json").read_text())["precision"] == "fp16"
    assert inspect_main([".", "--verify", "--quiet"]) == 0
    assert entries(tmp_path) == ["here"] and not any(n.startswith(".tokprune-old") for n in entries(here))


def test_force_keeps_hidden_user_files_in_an_export(baseline, schedules, tmp_path, capsys):
    out = tmp_path / "two"
    shutil.copytree(baseline, out)
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main")
    assert export(out, schedules["dense"], "--force") == 2
    one_line_error(capsys.readouterr().err, "did not write (.git/", "move them away")
    assert (out / ".git" / "HEAD").read_text() == "ref: refs/heads/main" and (out / "manifest.json").is_file()
    assert entries(tmp_path) == ["two"]


def test_out_dot_in_a_folder_of_user_files_is_refused(schedules, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.tex").write_text("t")
    assert export(".", schedules["two"], "--force") == 2
    one_line_error(capsys.readouterr().err, "not a tokprune export", "thesis.tex")
    assert entries(tmp_path) == ["thesis.tex"] and entries(tmp_path.parent).count(".%s.partial" % tmp_path.name) == 0


# ---- validation before work: nothing left behind -------------------------------------------------------
@pytest.mark.parametrize("flags, needle", [
    (["--policy", "bogus"], "--policy 'bogus'"),
    (["--num-prompts", "-1"], "--num-prompts -1"),
    (["--num-prompts", "0"], "--num-prompts 0"),
    (["--prompts", "EMPTY"], "--prompts"),
    (["--prompts", "BINARY"], "--prompts"),
    (["--prompts", "MISSING"], "--prompts"),
    (["--height", "30", "--width", "64"], "--height"),
    (["--budget", "0.01"], "--budget"),
    (["--steps", "1"], "--steps"),
    (["--max-buckets", "0"], "--max-buckets"),
    (["--schedule", "MISSING"], "--schedule"),
])
def test_bad_input_is_refused_and_leaves_nothing(flags, needle, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "EMPTY").write_text("\n# nothing\n")
    (inputs / "BINARY").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    files = {"EMPTY": str(inputs / "EMPTY"), "BINARY": str(inputs / "BINARY"), "MISSING": str(inputs / "none")}
    flags = [files.get(f, f) for f in flags]
    budget = [] if "--budget" in flags or "--schedule" in flags else ["--budget", "0.5"]
    work = tmp_path / "work"
    work.mkdir()
    rc = export_main(["--model", "sd3-tiny", "--steps", "4", "--out", str(work / "e"), "--quiet", *budget, *flags])
    assert rc == 2
    one_line_error(capsys.readouterr().err, needle)
    assert entries(work) == []  # no .e.partial, no lock, no e


# ---- interrupt at several points, then resume: the same export --------------------------------------------
@pytest.mark.parametrize("where", ["second-bucket", "manifest"])
def test_interrupt_then_resume_equals_an_uninterrupted_export(where, baseline, schedules, tmp_path, monkeypatch, capsys):
    out = tmp_path / "two"
    calls: list[str] = []
    if where == "second-bucket":
        real = exporter.export_bucket_onnx

        def interrupt(model, spec, path, **kwargs):
            calls.append(spec.key)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(model, spec, path, **kwargs)

        monkeypatch.setattr(exporter, "export_bucket_onnx", interrupt)
    else:
        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(exporter, "write_manifest", interrupt)
    assert export(out, schedules["two"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("tokprune-export: interrupted; re-run the same command to resume")
    assert not out.exists() and (tmp_path / ".two.partial").is_dir()
    monkeypatch.undo()
    assert export(out, schedules["two"]) == 0, capsys.readouterr().err
    assert "reused" in capsys.readouterr().out
    assert entries(tmp_path) == ["two"]
    assert_same_export(out, baseline)


def test_interrupt_during_calibration_then_resume(tmp_path, monkeypatch, capsys):
    import tokprune.calibrate as calibrate_pkg

    real = calibrate_pkg.calibrate

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "dense"
    base = ["--model", "sd3-tiny", "--budget", "1.0", "--steps", "3", "--num-prompts", "1", "--quiet"]
    monkeypatch.setattr(calibrate_pkg, "calibrate", interrupt)
    assert export_main([*base, "--out", str(out)]) == 130
    assert "re-run the same command to resume" in capsys.readouterr().err
    assert (tmp_path / ".dense.partial" / exporter.STATE_FILE).is_file() and not out.exists()
    monkeypatch.setattr(calibrate_pkg, "calibrate", real)
    assert export_main([*base, "--out", str(out)]) == 0, capsys.readouterr().err
    assert export_main([*base, "--out", str(tmp_path / "again")]) == 0
    assert (out / "schedule.json").read_bytes() == (tmp_path / "again" / "schedule.json").read_bytes()  # deterministic
    assert_same_export(out, tmp_path / "again")
    assert entries(tmp_path) == ["again", "dense"]


def test_an_unknown_work_directory_is_not_deleted(schedules, tmp_path, capsys):
    partial = tmp_path / ".two.partial"
    partial.mkdir()
    (partial / "precious.txt").write_text("not tokprune's")
    assert export(tmp_path / "two", schedules["two"]) == 2
    one_line_error(capsys.readouterr().err, str(partial), "was not made by tokprune-export")
    assert (partial / "precious.txt").read_text() == "not tokprune's"


# ---- tampering: tokprune-inspect --verify ------------------------------------------------------------------
def _tampered(baseline: Path, tmp_path: Path, edit) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(baseline, d)
    data = json.loads((d / "manifest.json").read_text())
    edit(data)
    (d / "manifest.json").write_text(json.dumps(data, indent=2))
    return d


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m["model"].__setitem__("fingerprint", "0123456789abcdef"), ["field model.fingerprint was edited"]),
    (lambda m: m.__setitem__("steps", 5), ["field steps was edited", "steps is 5 but step_buckets lists 4 steps"]),
    (lambda m: m.__setitem__("buckets", m["buckets"][:1]), [f"bucket {PRUNED} was removed from the manifest"]),
    (lambda m: m["geometry"].__setitem__("heads", 8), ["field geometry.heads was edited"]),
])
def test_verify_names_the_tampered_fields(edit, expected, baseline, tmp_path, capsys):
    d = _tampered(baseline, tmp_path, edit)
    assert inspect_main([str(d), "--verify", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err
    assert "unexpected file" not in err  # a removed bucket is reported as such, not as a stray file


def test_runtime_refuses_a_manifest_with_a_bucket_removed(baseline, tmp_path):
    from tokprune import runtime
    from tokprune.errors import ManifestError

    d = _tampered(baseline, tmp_path, lambda m: m.__setitem__("buckets", m["buckets"][:1]))
    with pytest.raises(ManifestError, match=f"bucket {PRUNED} was removed from the manifest"):
        runtime.load(d)


def test_an_old_manifest_without_a_hash_still_verifies_its_files(baseline, tmp_path, capsys):
    d = _tampered(baseline, tmp_path, lambda m: m.pop("integrity"))
    assert inspect_main([str(d), "--verify", "--quiet"]) == 0
    assert "no content hash" in capsys.readouterr().out
    (d / "weights.bin").write_bytes(b"x")
    assert inspect_main([str(d), "--verify", "--quiet"]) == 1
    assert "corrupted: weights.bin" in capsys.readouterr().err


def test_verify_passes_on_the_untouched_export(baseline, capsys):
    assert inspect_main([str(baseline), "--verify", "--quiet"]) == 0
    assert "verified: the manifest matches its content hash" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"{not json", b"\x00\x01"])
def test_inspect_a_broken_manifest(content, baseline, tmp_path, capsys):
    d = tmp_path / "copy"
    shutil.copytree(baseline, d)
    (d / "manifest.json").write_bytes(content)
    assert inspect_main([str(d), "--verify"]) == 1
    one_line_error(capsys.readouterr().err, "manifest.json", "re-export")


def test_inspect_and_build_on_a_directory_that_is_not_an_export(tmp_path, capsys):
    assert inspect_main([str(tmp_path / "none")]) == 1
    one_line_error(capsys.readouterr().err, "manifest.json does not exist")
    assert build_main([str(tmp_path)]) == 1
    one_line_error(capsys.readouterr().err, "manifest.json")


# ---- tokprune-calibrate: --out checked before hours of work ----------------------------------------------------
@pytest.mark.parametrize("case, needle", [
    ("read-only", "cannot write there"),
    ("directory", "is a directory"),
    ("extension", "expected one of .json"),
    ("binary-prompts", "--prompts"),
    ("checkpoint-is-a-file", "--checkpoint-dir"),
    ("num-prompts", "--num-prompts -1"),
    ("batch-size", "--batch-size 0"),
])
def test_calibrate_refuses_before_loading_the_model(case, needle, tmp_path, capsys, monkeypatch):
    from tokprune.calibrate.cli import main as calibrate_main

    from tests.test_fsutil import readonly_dir

    import tokprune.models

    monkeypatch.setattr(tokprune.models, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "bin.txt").write_bytes(b"\x00\xff\x00")
    (tmp_path / "ckpt").write_text("a file")
    out, extra = tmp_path / "s.json", []
    if case == "read-only":
        out = readonly_dir(tmp_path) / "s.json"
    elif case == "directory":
        out = tmp_path
    elif case == "extension":
        out = tmp_path / "s.txt"
    elif case == "binary-prompts":
        extra = ["--prompts", str(tmp_path / "bin.txt")]
    elif case == "checkpoint-is-a-file":
        extra = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    elif case == "num-prompts":
        extra = ["--num-prompts", "-1"]
    else:
        extra = ["--batch-size", "0"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert calibrate_main(["--model", "sd3-tiny", "--budget", "0.5", "--out", str(out), "--quiet", *extra]) == 2
    one_line_error(capsys.readouterr().err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---- calibration checkpoints: an interrupted calibration resumes ---------------------------------------------
def _has_checkpoints() -> bool:
    import inspect

    from tokprune.calibrate import calibrate

    return "checkpoint_dir" in inspect.signature(calibrate).parameters


needs_checkpoints = pytest.mark.skipif(not _has_checkpoints(), reason="this checkout's calibrate() has no checkpoint_dir")


def _interrupt_third_measurement(monkeypatch) -> None:
    from tokprune.calibrate import checkpoint

    real, seen = checkpoint.RolloutStore.put, []

    def put(self, *args, **kwargs):
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt  # Ctrl-C after two measured runs were checkpointed
        return real(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint.RolloutStore, "put", put)


@needs_checkpoints
def test_export_interrupted_mid_calibration_reuses_the_measured_runs(tmp_path, monkeypatch, capsys):
    flags = ["--model", "sd3-tiny", "--budget", "0.5", "--steps", "4", "--num-prompts", "2", "--quiet",
             "--log-level", "info"]
    _interrupt_third_measurement(monkeypatch)
    assert export_main([*flags, "--out", str(tmp_path / "e")]) == 130
    assert (tmp_path / ".e.partial" / exporter.CALIBRATION_DIR).is_dir()
    capsys.readouterr()
    monkeypatch.undo()
    assert export_main([*flags, "--out", str(tmp_path / "e")]) == 0
    assert "2 measured runs reused" in capsys.readouterr().err
    assert export_main([*flags, "--out", str(tmp_path / "fresh")]) == 0
    assert_same_export(tmp_path / "e", tmp_path / "fresh")  # schedule.json, weights, ONNX byte for byte
    assert entries(tmp_path) == ["e", "fresh"] and "calibration" not in entries(tmp_path / "e")


@needs_checkpoints
def test_calibrate_interrupted_resumes_from_its_checkpoint_dir(tmp_path, monkeypatch, capsys):
    from tokprune.calibrate.cli import main as calibrate_main

    flags = ["--model", "sd3-tiny", "--budget", "0.5", "--steps", "4", "--num-prompts", "2", "--quiet",
             "--log-level", "info"]
    _interrupt_third_measurement(monkeypatch)
    assert calibrate_main([*flags, "--out", str(tmp_path / "s.json")]) == 130
    assert not (tmp_path / "s.json").exists() and (tmp_path / "s.calibration").is_dir()
    capsys.readouterr()
    monkeypatch.undo()
    assert calibrate_main([*flags, "--out", str(tmp_path / "s.json")]) == 0
    assert "2 measured runs reused" in capsys.readouterr().err
    assert calibrate_main([*flags, "--out", str(tmp_path / "t.json"), "--checkpoint-dir", str(tmp_path / "t.ckpt")]) == 0
    assert (tmp_path / "s.json").read_bytes() == (tmp_path / "t.json").read_bytes()
    assert not (tmp_path / "s.calibration").exists()  # the default checkpoint dir goes after success
    assert (tmp_path / "t.ckpt" / "rollouts.jsonl").is_file()  # an explicit --checkpoint-dir stays


@needs_checkpoints
def test_a_real_sigint_during_calibration(tmp_path, capsys):
    """SIGINT to a running tokprune-calibrate: exit 130, one line, then a re-run reuses what was measured."""
    import signal
    import subprocess
    import sys
    import time

    from tokprune.calibrate.cli import main as calibrate_main

    flags = ["--model", "sd3-tiny", "--budget", "0.5", "--steps", "8", "--num-prompts", "4", "--quiet",
             "--out", str(tmp_path / "s.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A shell starts background jobs with SIGINT ignored, and Python then keeps it ignored: restore Ctrl-C's
    # default handler in the child, as an interactive terminal would give it.
    proc = subprocess.Popen([sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGINT, "
                             "signal.default_int_handler); from tokprune.calibrate.cli import main; "
                             "sys.exit(main(sys.argv[1:]))", *flags], stderr=subprocess.PIPE, text=True, env=env)
    log = tmp_path / "s.calibration" / "rollouts.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if log.is_file() and log.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "calibration finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert one_line_error(err, "tokprune-calibrate: interrupted").endswith("(measured rollouts are checkpointed)")
    assert not (tmp_path / "s.json").exists()
    assert calibrate_main([*flags, "--log-level", "info"]) == 0
    assert "measured runs reused" in capsys.readouterr().err and (tmp_path / "s.json").is_file()


def test_inspect_a_manifest_missing_a_field_without_verify(baseline, tmp_path, capsys):
    d = _tampered(baseline, tmp_path, lambda m: m["versions"].pop("torch"))
    assert inspect_main([str(d)]) == 1
    one_line_error(capsys.readouterr().err, "manifest.json cannot be shown", "--verify")
    assert inspect_main([str(d), "--verify"]) == 1
    assert "field versions.torch was removed after export" in capsys.readouterr().err


def test_build_refuses_an_edited_manifest_before_rewriting_it(baseline, tmp_path, capsys):
    d = _tampered(baseline, tmp_path, lambda m: m.__setitem__("steps", 5))
    before = (d / "manifest.json").read_bytes()
    assert build_main([str(d)]) == 1
    one_line_error(capsys.readouterr().err, "field steps was edited", "re-export")
    assert (d / "manifest.json").read_bytes() == before


# ---- schedule.json: the same run gives the same content hash ----------------------------------------------------
def test_schedule_hash_ignores_diffusers_private_scheduler_keys(schedules, tmp_path):
    from tokprune.calibrate.schedule import Schedule, canonical_json

    base = Schedule.load(schedules["two"])
    body = base.to_dict(include_hash=False)
    a = Schedule.from_dict({**body, "content_hash": base.content_hash})
    variants = []
    for order in (["shift", "base_shift"], ["base_shift", "shift"]):
        cfg = {**body["scheduler_config"], "_use_default_values": order, "_class_name": "X", "_diffusers_version": "0"}
        variants.append(Schedule(**{**{k: getattr(a, k) for k in body}, "scheduler_config": cfg}))
    assert variants[0].content_hash == variants[1].content_hash == a.content_hash
    assert variants[0].to_json() == a.to_json()
    # a schedule file written before the private keys were dropped still loads
    import hashlib

    legacy = {**body, "scheduler_config": {**body["scheduler_config"], "_use_default_values": ["b", "a"]}}
    legacy["content_hash"] = hashlib.sha256(canonical_json(legacy).encode("ascii")).hexdigest()
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    assert Schedule.load(tmp_path / "old.json").content_hash == a.content_hash
