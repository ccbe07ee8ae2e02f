"""Class-Balanced Self-Training (CBST) for domain adaptation of semantic segmentation."""

import os

# Idle OpenMP threads of PyTorch's CPU kernels sleep instead of spinning (unless the user chose
# otherwise). Where cores are shared (other jobs, data-loader workers), spinning threads stall
# each other: a training step of the small model on 2 busy cores took 5 s instead of 0.5 s. It
# takes effect when cbst is imported before torch (the ``cbst`` command, ``python -m cbst``).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
