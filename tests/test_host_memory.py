"""Training without CUDA hands the heap's freed pages back to the OS (`llmq.methods.offline.ReturnFreedHostMemory`)."""

import subprocess
import sys

import pytest
import torch

# A fresh process allocates a pattern that glibc's heap keeps resident: after one 16 MiB tensor is freed, its dynamic
# mmap threshold puts 4 MiB tensors on the heap, and the small tensors kept between them pin the freed holes below the
# heap's top. The callback's step end then runs as the Trainer runs it.
PATTERN = """
import torch
from llmq.methods.offline import ReturnFreedHostMemory

def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

torch.ones(4 * 2**20).sum()  # 16 MiB, freed at once
before = resident_mib()
large, kept = [], []
for _ in range(64):
    large.append(torch.ones(2**20))  # 4 MiB
    kept.append(torch.ones(2**12))  # 16 KiB
grown = resident_mib() - before
del large
ReturnFreedHostMemory().on_step_end(args=None, state=None, control=None)
print(grown, resident_mib() - before)
"""


@pytest.mark.skipif(torch.cuda.is_available() or not sys.platform.startswith("linux"), reason="glibc host memory")
def test_a_training_step_without_cuda_returns_freed_tensors_to_the_os():
    finished = subprocess.run([sys.executable, "-c", PATTERN], capture_output=True, text=True, check=True)
    grown, left = map(float, finished.stdout.split())
    assert grown > 200  # 64 tensors of 4 MiB were resident
    assert left < 0.1 * grown, f"{left:.0f} of {grown:.0f} MiB stayed resident after the tensors were freed"
