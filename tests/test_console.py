"""tokprune.console: one error path for every command (one line, exit codes, --debug), noise filtered."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging

import pytest

from tokprune import console
from tokprune.errors import ConfigError, ModelNotFoundError, TokpruneError
from tokprune.export.errors import ExportError

SCRIPTS = {  # [project.scripts]
    "tokprune-export": "tokprune.export.cli:main",
    "tokprune-build": "tokprune.export.cli:build_main",
    "tokprune-inspect": "tokprune.export.cli:inspect_main",
    "tokprune-calibrate": "tokprune.calibrate.cli:main",
    "tokprune-generate": "tokprune.runtime.cli:generate_main",
    "tokprune-bench": "tokprune.bench.cli:main",
    "tokprune-quality": "tokprune.yardstick.quality:main",
    "tokprune-demo": "tokprune.demo.cli:main",
    "tokprune-serve": "tokprune.serve.cli:main",
    "tokprune-triton": "tokprune.serve.triton:main",
}


def test_every_console_script_is_checked_here():
    """A new console script must be added above, so the shared-runner checks below cover it."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"] == SCRIPTS


def _main(script: str):
    module, name = SCRIPTS[script].split(":")
    return getattr(importlib.import_module(module), name)


def _run(exc: BaseException, capsys, *flags: str) -> tuple[int, str]:
    parser = console.add_common(argparse.ArgumentParser(prog="tokprune-x"))

    def body(args):
        raise exc

    code = console.run_cli(parser, list(flags), body)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("exc, code, text", [
    (ConfigError("--steps 0; expected >= 2"), 2, "tokprune-x: error: --steps 0; expected >= 2"),
    (ModelNotFoundError("model 'x' not found"), 2, "tokprune-x: error: model 'x' not found"),
    (ExportError("bucket k failed"), 1, "tokprune-x: error: bucket k failed"),
    (OSError(errno.ENOSPC, "No space left on device", "out.png"), 1,
     "tokprune-x: error: out.png: No space left on device; free some space and re-run"),
    (OSError(errno.EACCES, "Permission denied", "/x"), 1, "tokprune-x: error: /x: Permission denied; choose a writable"),
    (KeyboardInterrupt(), 130, "tokprune-x: interrupted"),
    (ValueError("boom"), 1, "tokprune-x: error: unexpected ValueError: boom (re-run with --debug for the traceback)"),
])
def test_one_line_and_exit_code_per_kind_of_failure(exc, code, text, capsys):
    got, err = _run(exc, capsys)
    assert got == code and err.startswith(text)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_multi_line_messages_become_one_line_in_flag_words(capsys):
    got, err = _run(ConfigError("the engines want\n  num_inference_steps=4 and guidance_scale 5"), capsys)
    assert got == 2 and err.strip() == "tokprune-x: error: the engines want --steps 4 and --guidance 5"


def test_debug_shows_the_traceback(capsys):
    got, err = _run(TokpruneError("failed"), capsys, "--debug")
    assert got == 1 and "Traceback (most recent call last)" in err and err.rstrip().endswith("tokprune-x: error: failed")


def test_usage_errors_exit_2_without_a_traceback(capsys):
    parser = console.add_common(argparse.ArgumentParser(prog="tokprune-x"))
    parser.add_argument("--n", type=int)
    assert console.run_cli(parser, ["--n", "many"], lambda a: 0) == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_command_documents_exit_codes_and_shared_flags(script, capsys):
    assert _main(script)(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # help text is wrapped to the terminal width
    assert "exit status: 0 ok, 1 failure" in out and "2 bad input" in out and "130 interrupted" in out
    assert "--debug" in out and "--quiet" in out and "--log-level" in out


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_command_refuses_an_unknown_flag_with_exit_2(script, capsys):
    assert _main(script)(["--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert ("unrecognized arguments: --no-such-flag" in err or "arguments are required" in err) and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"{script}: error: ")


def test_third_party_noise_is_filtered_and_truncation_counted_once(capsys, caplog):
    parser = console.add_common(argparse.ArgumentParser(prog="tokprune-x"))

    def body(args):
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back")
        logging.getLogger("diffusers.models.modeling_utils").warning(
            "There are modules in AutoencoderKL that should be kept in float32: []. Casting directly")
        clip = logging.getLogger("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3")
        for _ in range(3):
            clip.warning("The following part of your input was truncated because CLIP can only handle sequences up to"
                         " 77 tokens: " + "x " * 2000)
        logging.getLogger("diffusers.models.modeling_utils").warning("a real problem")
        return 0

    assert console.run_cli(parser, [], body) == 0
    err = capsys.readouterr().err
    assert "torchvision" not in err and "float32: []" not in err and "x x x" not in err
    assert "note: 3 prompt batch(es) held prompts longer than CLIP's 77 tokens" in err
    assert "a real problem" in caplog.text  # a real third-party warning passes the filter
    assert "torchvision" not in caplog.text and "float32: []" not in caplog.text


def test_debug_lets_third_party_warnings_through(caplog):
    parser = console.add_common(argparse.ArgumentParser(prog="tokprune-x"))

    def body(args):
        logging.getLogger("transformers.utils.import_utils").warning("`X` requires torchvision (not installed)")
        return 0

    assert console.run_cli(parser, ["--debug"], body) == 0
    assert "requires torchvision" in caplog.text
    console.setup("tokprune-x")  # filters back on for the tests that follow
