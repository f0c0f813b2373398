"""Child process of tests/bench/test_harness.py: prints its thread settings as one JSON line."""

import json
import os

import torch

print(json.dumps({"omp": os.environ.get("OMP_NUM_THREADS"), "threads": torch.get_num_threads()}))
