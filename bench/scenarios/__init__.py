"""Scenario programs: one file per measured set-up, built from the bench package (no own timing, MACs or schedules).

- :mod:`~tokprune.bench.scenarios.gpu_ready`: SD3-medium architecture on one GPU, dense vs CAT-pruned, every
  backend (``python3 results/gpu/scenario_gpu_ready.py --out $OUT``; ``--dry-run`` on a CPU);
- :mod:`~tokprune.bench.scenarios.layout_cpu`: ONNX Runtime on CPU, one dynamic-K graph vs a static graph per
  bucket, each layout in its own process (``python3 -m tokprune.bench.scenarios.layout_cpu --out DIR``).
"""
