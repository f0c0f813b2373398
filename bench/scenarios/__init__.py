"""Scenario programs: one file per measured set-up, built from the bench package (no own timing, MACs or schedules).

- :mod:`~tokprune.bench.scenarios.gpu_ready`: SD3-medium architecture on one GPU, dense vs CAT-pruned, every
  backend (``python3 results/gpu/scenario_gpu_ready.py --out $OUT``; ``--dry-run`` on a CPU).
"""
