"""The ``tokprune-export`` command line, written in one place.

Two jobs, both about the text a user can paste back into a shell:

- :func:`command_line`: the invocation as typed (recorded in the manifest, so an export says how it
  was made, and a re-run can recognise its own export);
- :func:`export_command`: the command that makes an export like a recorded one, with any flag
  changed or left out (refusals use it to say what would fit: another size, another text length,
  another model).

Example::

    from tokprune.export.command import command_line, export_command
    command_line(["--model", "shapes", "--schedule", "my schedule.json"])
    # "tokprune-export --model shapes --schedule 'my schedule.json'"
    data = {"model": {"name": "sd3-tiny", "ref": "sd3-tiny"}, "height": 64, "width": 64, "steps": 8,
            "guidance": 7.0, "budget": 0.5}
    export_command(data, height=128, width=128)
    # 'tokprune-export --model sd3-tiny --height 128 --width 128 --steps 8 --guidance 7 --budget 0.5'
    export_command(data, height=None, width=None, steps=None, guidance=None)
    # 'tokprune-export --model sd3-tiny --budget 0.5'
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["PROG", "command_line", "export_command"]

PROG = "tokprune-export"

# Flags in the order they are written, each read from the manifest's data unless overridden.
_FLAGS = ("model", "height", "width", "steps", "guidance", "budget", "max_sequence_length", "out", "force")
_KEEP = object()


def command_line(argv: Sequence[str]) -> str:
    """``tokprune-export`` followed by ``argv``, each word quoted for a POSIX shell."""
    return shlex.join([PROG, *map(str, argv)])


def _recorded(data: Mapping[str, Any], flag: str) -> Any:
    if flag == "model":
        model = data.get("model") or {}
        return model.get("ref") or model.get("name")
    if flag == "max_sequence_length":
        return (data.get("export_config") or {}).get("max_sequence_length")
    if flag in ("out", "force"):
        return None
    return data.get(flag)


def export_command(data: Mapping[str, Any], **flags: Any) -> str:
    """The ``tokprune-export`` command for an export like the one ``data`` (a manifest's data) describes.

    Every flag of ``model, height, width, steps, guidance, budget, max_sequence_length`` is taken from
    ``data`` (the model's hub id or path where recorded, else its name; the text length only when the
    export recorded one) unless given: a value replaces it, ``None`` leaves the flag out. ``out=DIR``
    and ``force=True`` add ``--out DIR`` and ``--force``.

    Raises:
        TypeError: a flag that ``tokprune-export`` does not have.
    """
    unknown = sorted(set(flags) - set(_FLAGS))
    if unknown:
        raise TypeError(f"export_command: unknown flag(s) {unknown}; expected some of {list(_FLAGS)}")
    words = [PROG]
    for flag in _FLAGS:
        value = flags.get(flag, _KEEP)
        value = _recorded(data, flag) if value is _KEEP else value
        if value is None or value is False:
            continue
        name = "--" + flag.replace("_", "-")
        if value is True:
            words.append(name)
        elif isinstance(value, float):
            words += [name, f"{value:g}"]
        else:
            words += [name, shlex.quote(str(value))]
    return " ".join(words)
