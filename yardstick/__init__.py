"""The trained yardstick: a procedural shapes dataset, its checker, and the small model trained on it.

Random-weight models measure speed, never quality; this package gives tokprune a small
text-to-image model whose output can be *scored*, so pruned and dense sampling can be
compared on a task metric.

- :mod:`~tokprune.yardstick.dataset`  scenes of 1-3 coloured shapes on a 3x3 grid, captioned,
  a pure function of ``(index, seed)`` (train seed 0, held-out seed 1)
- :mod:`~tokprune.yardstick.checker`  reads position / colour / shape / size back off pixels
- :mod:`~tokprune.yardstick.model`    the complete ``StableDiffusion3Pipeline`` (tokenizers from the
  closed vocabulary, frozen tiny text encoders, tiny VAE, 8-block SD3 transformer), save / load
- :mod:`~tokprune.yardstick.train`    ``python -m tokprune.yardstick.train --out DIR --device cuda --minutes 8``
  (set-up, resume, final choice and saving), with :mod:`~tokprune.yardstick.train_config` (the run's
  settings and checkpointed progress), :mod:`~tokprune.yardstick.train_data` (batches, text encoding) and
  :mod:`~tokprune.yardstick.train_loop` (the VAE and transformer phases)
- :mod:`~tokprune.yardstick.evaluate` ``evaluate(pipe, n=64) -> {"mean": ..., "position": ..., ...}``
- :mod:`~tokprune.yardstick.pack`     move a model directory through per-file size limits
- :mod:`~tokprune.yardstick.pixart_model`, :mod:`~tokprune.yardstick.pixart_train`  the PixArt-Σ-architecture
  twin (``train --arch pixart``, ``--model pixart-shapes``): same dataset, VAE and checker

The comparison (``tokprune-quality``), one job per module:

- :mod:`~tokprune.yardstick.metrics`  per-object mask IoU, bootstrap intervals (PSNR / SSIM from :mod:`tokprune.fidelity`)
- :mod:`~tokprune.yardstick.counting` transformer MACs counted while they run (``MacCounter``)
- diffusers' own caches on SD3 come from :mod:`tokprune.families.sd3.caches`
- :mod:`~tokprune.yardstick.runs`     dense / planned / cached runs of one chunk of captions, decoding
- :mod:`~tokprune.yardstick.rows`     the rows: calibrated, cat, ras, interleaved, random, caches
- :mod:`~tokprune.yardstick.store`    resumable records (append-only JSONL)
- :mod:`~tokprune.yardstick.driver`   the work loop (prepare once, then chunk by chunk)
- :mod:`~tokprune.yardstick.report`   means, intervals, findings, markdown, plot
- :mod:`~tokprune.yardstick.quality`  the ``tokprune-quality`` command

Heavy dependencies (diffusers, transformers) are imported inside functions.
"""

from pathlib import Path as _Path

#: The trained yardstick shipped with the package (``--model shapes``); training command in its training.json.
SHAPES_DIR = _Path(__file__).resolve().parent / "weights" / "shapes"
#: Where ``--model pixart-shapes`` is read from (trained with ``--arch pixart``, then unpacked here).
PIXART_SHAPES_DIR = _Path(__file__).resolve().parent / "weights" / "pixart-shapes"


def load_shapes_pipeline():
    """trained 8-block SD3 on procedural shapes (128 px, N=1024, T=109): the quality yardstick

    The shipped ``shapes`` pipeline, with its sampling settings recorded for tokprune's tools.
    ``--model shapes`` reaches it through the ``tokprune.models`` entry-point table
    (``pyproject.toml``), so :mod:`tokprune.models` never imports this package; the first line of
    this docstring is the description ``--help`` and "unknown model" errors show.

    Example:
        >>> from tokprune.models import load_pipeline
        >>> pipe = load_pipeline("shapes")  # doctest: +SKIP
    """
    from tokprune.yardstick.dataset import sample_spec
    from tokprune.yardstick.model import load_pipeline

    from tokprune.models import set_call_defaults

    pipe, meta = load_pipeline(SHAPES_DIR)
    # calibration measures in-distribution captions of the train split (split seed 0), never the held-out one
    return set_call_defaults(pipe, meta.generation_kwargs(), calibration_prompts=[sample_spec(i, 0).caption for i in range(80)])


def load_pixart_shapes_pipeline():
    """trained 8-block PixArt-Σ architecture on procedural shapes (128 px, N=1024, T=32): the second yardstick

    ``--model pixart-shapes``: the PixArt twin of ``shapes`` (same dataset, VAE and checker), read from
    ``yardstick/weights/pixart-shapes``. Train and unpack it with::

        python -m tokprune.yardstick.train --arch pixart --device cuda --minutes 4 --out runs/pix --pack-to runs/pix/pack
        python -m tokprune.yardstick.pack unpack runs/pix/pack yardstick/weights/pixart-shapes

    Example:
        >>> from tokprune.models import load_pipeline
        >>> pipe = load_pipeline("pixart-shapes")  # doctest: +SKIP
    """
    from tokprune.errors import ModelNotFoundError

    if not (PIXART_SHAPES_DIR / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"--model pixart-shapes: {PIXART_SHAPES_DIR} has no model_index.json (got "
            f"{'an incomplete folder' if PIXART_SHAPES_DIR.exists() else 'no folder'}, expected an unpacked "
            "PixArt yardstick). Train it with `python -m tokprune.yardstick.train --arch pixart --device cuda "
            "--minutes 4 --out runs/pix --pack-to runs/pix/pack`, then unpack it with `python -m "
            f"tokprune.yardstick.pack unpack runs/pix/pack {PIXART_SHAPES_DIR}`"
        )
    from tokprune.models import set_call_defaults
    from tokprune.yardstick.dataset import sample_spec
    from tokprune.yardstick.pixart_model import generation_kwargs, load_pipeline

    pipe, meta = load_pipeline(PIXART_SHAPES_DIR)
    return set_call_defaults(pipe, generation_kwargs(meta), calibration_prompts=[sample_spec(i, 0).caption for i in range(80)])
