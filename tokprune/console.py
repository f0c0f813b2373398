"""The one runner every console script goes through: flags, logging, warnings, errors, exit codes.

Every ``tokprune-*`` command builds its ``argparse`` parser, passes it through :func:`add_common`
(``--quiet``, ``--debug``, ``--log-level`` and the exit-code epilog) and calls :func:`run_cli`
with a body. The runner:

- sets up one log format on the ``tokprune`` logger (``PROG: warning: ...`` for warnings,
  plain text for progress);
- filters third-party noise (torchvision / accelerate notices, "kept in float32: []", CLIP's
  prompt truncation, which is counted and reported as one note) unless ``--debug``;
- turns every failure into ONE line ``PROG: error: ...`` in the command's own words, with exit
  codes 0 ok, 1 failure, 2 bad input, 130 interrupted; ``--debug`` prints the traceback too.

Example::

    def main(argv=None) -> int:
        parser = add_common(argparse.ArgumentParser(prog="tokprune-x"))
        parser.add_argument("--n", type=int, default=1)
        return run_cli(parser, argv, lambda args: print(args.n) or 0)

Every console script of ``pyproject.toml`` goes through :func:`run_cli`; tests check that each one's
``--help`` documents the shared flags and the exit statuses.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from tokprune.errors import ConfigError, ModelNotFoundError, ScheduleError, ShapeError, TokpruneError

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_CODES_EPILOG",
    "add_common",
    "exit_code",
    "one_line",
    "run_cli",
]

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES_EPILOG = (
    "exit status: 0 ok, 1 failure (the message says what failed), 2 bad input (a flag, file or model), "
    "130 interrupted (Ctrl-C). --debug shows the traceback."
)
BAD_INPUT = (ConfigError, ShapeError, ScheduleError, ModelNotFoundError)

# Third-party messages that say nothing a user can act on. (logger name, substring) -> dropped.
_NOISE = (
    ("transformers", "requires torchvision"),
    ("transformers", "torchvision is not available"),
    ("diffusers", "should be kept in float32: []"),
    ("accelerate", ""),
    ("diffusers", "because `accelerate` was not found"),
    ("transformers", "`accelerate` is not installed"),
    ("diffusers", "Keyword arguments {'torch_dtype'"),
)
# Prompt truncation: dropped and counted; one note at the end of the command.
_TRUNCATION = {
    "clip": "was truncated because CLIP can only handle sequences up to",
    "t5": "was truncated because `max_sequence_length` is set to",
    "tokenizer": "Token indices sequence length is longer than the specified maximum",
}
_PYWARNINGS = (
    r".*torchvision.*",
    r".*accelerate.*",
    r".*TypedStorage is deprecated.*",
    r".*torch\.onnx.*",
    r".*TorchScript.*",
    r".*`torch_dtype` is deprecated.*",
    r".*upcast_vae.*",
)


class _NoiseFilter(logging.Filter):
    """Drops third-party noise on the logger it is attached to; counts prompt truncations."""

    def __init__(self) -> None:
        super().__init__()
        self.truncated: dict[str, int] = {k: 0 for k in _TRUNCATION}

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is not ours to judge
            return True
        for key, needle in _TRUNCATION.items():
            if needle in msg:
                self.truncated[key] += 1
                return False
        if record.levelno >= logging.ERROR:
            return True
        return not any(record.name.startswith(lib) and needle in msg for lib, needle in _NOISE)


_FILTER = _NoiseFilter()
_FILTERED_LOGGERS = (
    "transformers",
    "transformers.utils.import_utils",
    "transformers.tokenization_utils_base",
    "diffusers",
    "diffusers.models.modeling_utils",
    "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3",
    "diffusers.configuration_utils",
    "accelerate",
    "accelerate.utils.modeling",
)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _Formatter(logging.Formatter):
    def __init__(self, prog: str, debug: bool) -> None:
        super().__init__()
        self.prog, self.debug = prog, debug

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if self.debug:
            return f"{record.levelname} {record.name}: {msg}"
        if record.levelno >= logging.WARNING:
            return f"{self.prog}: {record.levelname.lower()}: {msg}"
        return msg


class _ParagraphHelp(argparse.HelpFormatter):
    """Wraps each paragraph (blank-line separated) on its own, so the epilog's example and the exit
    status stay apart while long descriptions are still wrapped."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text
        return "\n\n".join([fill(part, width, indent) for part in text.split("\n\n")])


def add_common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--quiet``, ``--debug``, ``--log-level`` and the exit-status epilog. Returns ``parser``."""
    group = parser.add_argument_group("output")
    group.add_argument("--quiet", action="store_true", help="no progress bars or info messages")
    group.add_argument("--debug", action="store_true", help="show tracebacks and third-party warnings")
    group.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None,
                       help="log level of tokprune's messages (default info; --quiet: warning; --debug: debug)")
    parser.epilog = f"{parser.epilog}\n\n{EXIT_CODES_EPILOG}" if parser.epilog else EXIT_CODES_EPILOG
    if parser.formatter_class is argparse.HelpFormatter:
        parser.formatter_class = _ParagraphHelp
    return parser


def _level(quiet: bool, debug: bool, log_level: str | None) -> int:
    if log_level:
        return getattr(logging, log_level.upper())
    return logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO


def setup(prog: str, *, quiet: bool = False, debug: bool = False, log_level: str | None = None) -> None:
    """Logging and warning filters for one command (idempotent; the last call wins)."""
    root = logging.getLogger("tokprune")
    handler = next((h for h in root.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        root.addHandler(handler)
    handler.setFormatter(_Formatter(prog, debug))
    root.setLevel(_level(quiet, debug, log_level))
    _FILTER.truncated = {k: 0 for k in _TRUNCATION}
    for name in _FILTERED_LOGGERS:
        lg = logging.getLogger(name)
        if debug:
            lg.removeFilter(_FILTER)
        elif _FILTER not in lg.filters:
            lg.addFilter(_FILTER)
    if not debug:
        for pattern in _PYWARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=r"(diffusers|transformers|torch|onnx|onnxscript|accelerate)\b")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _truncation_note() -> None:
    n = _FILTER.truncated
    log = logging.getLogger("tokprune")
    if n["clip"] or n["tokenizer"]:
        log.info("note: %d prompt batch(es) held prompts longer than CLIP's 77 tokens; CLIP saw their first 77 tokens "
                 "(T5 sees more)", max(n["clip"], n["tokenizer"]))
    if n["t5"]:
        log.info("note: %d prompt batch(es) were cut to the T5 length (--max-sequence-length)", n["t5"])


def one_line(text: str) -> str:
    """Collapse a message to one line (tracebacks only with --debug)."""
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


# Python keyword spellings that leak from the API into messages, in the CLI's words.
_KWARG_TO_FLAG = (
    (r"\bnum_inference_steps=", "--steps "),
    (r"\bguidance_scale=", "--guidance "),
    (r"\bguidance_scale\b", "--guidance"),
    (r"\bheight=", "--height "),
    (r"\bwidth=", "--width "),
    (r"\bdevice='(\w+)'", r"--device \1"),
    (r"\bmax_sequence_length=", "--max-sequence-length "),
    (r"\bnum_prompts=", "--num-prompts "),
    (r"\bpolicy=", "--policy "),
)


def _flag_words(text: str) -> str:
    for pattern, repl in _KWARG_TO_FLAG:
        text = re.sub(pattern, repl, text)
    return text


def _os_error_text(exc: OSError) -> str:
    what = exc.strerror or str(exc)
    where = f"{exc.filename}" + (f" -> {exc.filename2}" if getattr(exc, "filename2", None) else "") if exc.filename else ""
    hint = {
        errno.ENOSPC: "free some space and re-run",
        errno.EACCES: "choose a writable place or fix the permissions",
        errno.EROFS: "the file system is read-only; choose another place",
        errno.ENOENT: "check the path",
        errno.EISDIR: "give a file name, not a directory",
    }.get(exc.errno or 0, "")
    return f"{where + ': ' if where else ''}{what}" + (f"; {hint}" if hint else "")


def exit_code(exc: BaseException) -> int:
    """The exit status for an exception (see :data:`EXIT_CODES_EPILOG`)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, BAD_INPUT):
        return EXIT_BAD_INPUT
    return EXIT_FAILURE


def report(prog: str, exc: BaseException, *, debug: bool, interrupted_hint: str = "") -> int:
    """Print one line for ``exc`` (plus the traceback with ``debug``) and return its exit status."""
    code = exit_code(exc)
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if isinstance(exc, KeyboardInterrupt):
        msg = "interrupted" + (f"; {interrupted_hint}" if interrupted_hint else "")
    elif isinstance(exc, TokpruneError):
        msg = _flag_words(one_line(exc))
    elif isinstance(exc, OSError):
        msg = one_line(_os_error_text(exc))
    else:
        msg = one_line(f"unexpected {type(exc).__name__}: {exc}") + ("" if debug else " (re-run with --debug for the traceback)")
    print(f"{prog}: error: {msg}" if code != EXIT_INTERRUPTED else f"{prog}: {msg}", file=sys.stderr)
    return code


def run_cli(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    body: Callable[[argparse.Namespace], int | None],
    *,
    interrupted_hint: str = "",
) -> int:
    """Parse ``argv`` with ``parser`` (built with :func:`add_common`), run ``body(args)``, map failures.

    Returns the exit status; never raises (argparse's own usage errors return 2).
    """
    prog = parser.prog
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed by argparse)
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_BAD_INPUT
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - even here: one line, no traceback
        return report(prog, exc, debug=argv is not None and "--debug" in argv)
    debug = bool(getattr(args, "debug", False))
    setup(prog, quiet=bool(getattr(args, "quiet", False)), debug=debug, log_level=getattr(args, "log_level", None))
    try:
        with warnings.catch_warnings():
            if not debug:
                for pattern in _PYWARNINGS:
                    warnings.filterwarnings("ignore", message=pattern)
            code = body(args)
        _truncation_note()
        return EXIT_OK if code is None else int(code)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the one error path of every command
        return report(prog, exc, debug=debug, interrupted_hint=interrupted_hint)
