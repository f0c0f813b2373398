"""tokprune-serve refuses a damaged export before starting Ray, with tokprune-inspect --verify's own lines."""

from __future__ import annotations

import shutil
import sys

import pytest

from tokprune.errors import ConfigError
from tokprune.export.cli import inspect_main
from tokprune.serve.cli import main as serve_main
from tokprune.serve.deployment import ServeOptions, deployment_kwargs


def _lines(text: str, prog: str) -> list[str]:
    return [line[len(prog) + 2:] for line in text.splitlines() if line.startswith(prog + ": ")]


def test_corrupted_directory_is_refused_with_the_inspect_message(tiny_export, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_export, bad)
    onnx = sorted(bad.glob("*.onnx"))[0]
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    monkeypatch.setitem(sys.modules, "ray", None)  # would fail loudly if the server got as far as Ray
    assert inspect_main([str(bad), "--verify"]) == 1
    want = _lines(capsys.readouterr().err, "tokprune-inspect")
    assert serve_main([str(bad)]) == 1
    got = _lines(capsys.readouterr().err, "tokprune-serve")
    assert got == want and any(onnx.name in line for line in got)


def test_missing_manifest_is_refused(tmp_path, capsys):
    assert serve_main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tokprune-serve: error:") and "manifest" in err


def test_without_ray_it_says_how_to_install(tiny_export, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert serve_main([str(tiny_export)]) == 2
    assert "pip install 'tokprune[serve]'" in capsys.readouterr().err


def test_options_are_checked_and_mapped():
    with pytest.raises(ConfigError, match="--min-replicas/--max-replicas: got 3..2"):
        ServeOptions(min_replicas=3, max_replicas=2).check()
    kw = deployment_kwargs(ServeOptions(min_replicas=0, max_replicas=4, num_cpus=2, num_gpus=1, max_ongoing_requests=3))
    assert kw["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in kw
    assert kw["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1} and kw["max_ongoing_requests"] == 3
    assert deployment_kwargs(ServeOptions(replicas=3))["num_replicas"] == 3


class _Died(Exception):
    pass


def test_ingress_reruns_a_request_whose_replica_died_once_then_says_so():
    import asyncio

    from tokprune.serve.deployment import run_with_retry
    from tokprune.serve.http import ServeFailure
    from tokprune.serve.request import GenerateRequest
    from tokprune.serve.worker import GenerateResult

    req = GenerateRequest("a", None, 1, 7.0, 6, 64, 64)

    def replica(outcomes):
        it = iter(outcomes)

        async def call():
            out = next(it)
            if isinstance(out, type) and issubclass(out, BaseException):
                raise out("actor died")
            return out

        return call

    ok = GenerateResult(png=b"x", seed=1)
    assert asyncio.run(run_with_retry(replica([_Died, ok]), req, lost=(_Died,))).retries == 1
    assert asyncio.run(run_with_retry(replica([ok]), req, lost=(_Died,))).retries == 0
    with pytest.raises(ServeFailure) as err:
        asyncio.run(run_with_retry(replica([_Died, _Died]), req, lost=(_Died,)))
    assert err.value.status == 503 and "died twice" in str(err.value)
    with pytest.raises(ServeFailure) as err:  # the replica's own failure is passed on, not retried
        asyncio.run(run_with_retry(replica([ServeFailure("RuntimeError: x", 500), ok]), req, lost=(_Died,)))
    assert err.value.status == 500


def test_sigterm_stops_with_0_and_ctrl_c_with_130(tiny_export, capsys, monkeypatch):
    """Through the shared CLI runner: a process manager's SIGTERM is a clean stop (0); Ctrl-C reads as interrupted."""
    import tokprune.serve.cli as cli

    def serve_then(exc):
        def fake(args):
            raise exc
        return fake

    monkeypatch.setattr(cli, "_stop_on_signals", lambda: None)  # no real handlers in the test process
    monkeypatch.setattr(cli, "_serve", serve_then(cli._Stopped()))
    assert serve_main([str(tiny_export)]) == 0 and "tokprune-serve: stopped" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_serve", serve_then(KeyboardInterrupt()))
    assert serve_main([str(tiny_export)]) == 130
    assert "tokprune-serve: interrupted; the server stopped cleanly" in capsys.readouterr().err
