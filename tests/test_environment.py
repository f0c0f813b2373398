"""tokprune.environment: the one recorder of versions, device and machine load."""

from __future__ import annotations

import platform

import torch

import tokprune
from tokprune.environment import device_name, environment, machine, versions


def test_versions_always_name_python_tokprune_torch_then_the_packages_asked_for():
    v = versions("numpy", "tokprune_no_such_package")
    assert list(v) == ["python", "tokprune", "torch", "numpy", "tokprune_no_such_package"]
    assert v["python"] == platform.python_version() and v["tokprune"] == tokprune.__version__
    assert v["torch"] == torch.__version__ and v["numpy"] is not None
    assert v["tokprune_no_such_package"] is None  # not installed: recorded as None, never an error


def test_cpu_device_name_says_cores_and_threads():
    name = device_name("cpu")
    assert name.startswith("cpu (") and f"{torch.get_num_threads()} threads" in name


def test_machine_and_environment_record_load_and_versions():
    m = machine(busiest=2)
    assert m["cpus"] and len(m["load_average"]) == 3 and m["time_utc"].endswith("Z") and len(m["busiest"]) <= 2
    env = environment("cpu", packages=("numpy",))
    assert env["device"] == "cpu" and env["torch_threads"] == torch.get_num_threads()
    assert set(env["versions"]) == {"python", "tokprune", "torch", "numpy"}
