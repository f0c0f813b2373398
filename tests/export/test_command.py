"""The one builder of the ``tokprune-export`` command line: recorded invocations and rebuild commands."""

from __future__ import annotations

import shlex

import pytest

from tokprune.export.command import command_line, export_command

DATA = {"model": {"name": "shapes", "ref": "shapes"}, "height": 128, "width": 96, "steps": 8, "guidance": 7.0,
        "budget": 0.5, "export_config": {"max_sequence_length": 32}}


def test_command_line_quotes_each_word_so_the_shell_reads_it_back():
    line = command_line(["--model", "my model", "--schedule", "a'b.json"])
    assert line.startswith("tokprune-export ") and shlex.split(line)[1:] == ["--model", "my model", "--schedule", "a'b.json"]


def test_export_command_takes_every_flag_from_the_manifest_data():
    assert export_command(DATA) == ("tokprune-export --model shapes --height 128 --width 96 --steps 8 --guidance 7 "
                                    "--budget 0.5 --max-sequence-length 32")


def test_export_command_overrides_drops_and_adds_flags():
    cmd = export_command(DATA, height=256, width=None, max_sequence_length=None, out="engines/a b", force=True)
    assert shlex.split(cmd) == ["tokprune-export", "--model", "shapes", "--height", "256", "--steps", "8", "--guidance",
                                "7", "--budget", "0.5", "--out", "engines/a b", "--force"]
    # the hub id / path is what the command needs, the short name only when nothing else was recorded
    assert "--model org/x " in export_command({**DATA, "model": {"name": "x", "ref": "org/x"}})
    assert export_command({"model": {"name": "x"}, "budget": 0.25}) == "tokprune-export --model x --budget 0.25"


def test_export_command_refuses_a_flag_the_command_does_not_have():
    with pytest.raises(TypeError, match="unknown flag"):
        export_command(DATA, sizes=3)
