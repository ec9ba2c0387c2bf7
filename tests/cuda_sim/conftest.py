"""The CUDA backend under numba-cuda's simulator; run by ``tests/test_cuda_sim.py``.

These tests need ``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported, so they run in
their own process; in any other process they are not collected.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    collect_ignore_glob = ["*.py"]
else:
    # Every simulated GPU thread is a Python thread; a short switch interval lets them pass
    # cuda.syncthreads() barriers quickly.
    sys.setswitchinterval(1e-4)
