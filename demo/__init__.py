"""``tokprune-demo``: the whole chain on one model, end to end, for a newcomer (``make demo``).

A program on top of every layer (calibrate -> export -> runtime, scored with the yardstick), so it lives
in its own top-level folder rather than inside the bottom-layer ``tokprune/`` package:

- :mod:`~tokprune.demo.cli`     the command: flags, calibration, export, the three timed runs
- :mod:`~tokprune.demo.report`  the picture grid and the speed table it writes

Example::

    tokprune-demo --model shapes --budget 0.5      # writes demo-output/grid.png and demo-output/speed.md
"""
