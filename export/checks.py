"""Input checks an export runs before it writes anything (issue 11: nothing left behind by a refusal).

:func:`precheck` runs before the model loads (``--out``, ``--policy``, ``--num-prompts``,
``--prompts``); :func:`check_calibration_inputs` right after it loads (a size the model cannot
take, a budget the steps cannot reach), still before the work directory exists.

Example::

    precheck(ExportConfig(model="sd3-tiny", budget=0.5, policy="bogus"), "engines/x", force=False)
    # ConfigError: unknown policy 'bogus' ...
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from tokprune.errors import ConfigError
from tokprune.fsutil import check_output_dir, read_text_input

__all__ = ["check_calibration_inputs", "checkpoint_kwargs", "precheck"]


def precheck(config: Any, out_dir: str | Path | None, force: bool) -> None:
    """Everything checkable before the model loads: --out, --policy, --num-prompts, --prompts."""
    from tokprune.export import outdir
    from tokprune.pruning.policies import make_policy

    if out_dir is not None:
        out = outdir.resolve_out(out_dir)
        check_output_dir(out, flag="--out")
        outdir.check_replaceable(out, force=force)
    if config.schedule_file is None:
        try:
            if config.policy is not None:  # None: the model family's default
                make_policy(config.policy)  # unknown name -> ConfigError listing the choices
        except ConfigError as exc:
            raise ConfigError(f"--policy {config.policy!r}: {exc}") from None
        n = config.num_prompts
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"--num-prompts {n!r}; expected an int >= 1")
        if config.prompts_file is not None:
            read_text_input(config.prompts_file, flag="--prompts", what="prompt")
    elif not Path(config.schedule_file).is_file():
        raise ConfigError(f"--schedule {config.schedule_file}: no such file; pass a schedule written by tokprune-calibrate")


def check_calibration_inputs(config: Any, pipe: Any, settings: dict[str, Any], max_sequence_length: int) -> None:
    """The calibration's own input checks (size the model can take, ...), before any directory is made."""
    from tokprune.calibrate.api import check_inputs
    from tokprune.export.config import policy_for

    check_inputs(pipe, budget=settings["budget"], steps=settings["steps"], height=settings["height"],
                 width=settings["width"], max_buckets=config.max_buckets, policy=policy_for(config, pipe),
                 max_sequence_length=max_sequence_length, reuse="noise")


def checkpoint_kwargs(fn: Any, directory: Path) -> dict[str, Any]:
    """``checkpoint_dir=directory`` when ``fn`` (calibrate) takes it: measured rollouts survive an interrupt."""
    try:
        return {"checkpoint_dir": directory} if "checkpoint_dir" in inspect.signature(fn).parameters else {}
    except (TypeError, ValueError):
        return {}
