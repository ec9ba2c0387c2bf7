"""The CUDA backend under numba-cuda's simulator; run by ``tests/test_cuda_sim.py``.

These tests need ``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported, so they run in
their own process; in any other process they are not collected.
"""

from __future__ import annotations

import os
import sys
import threading

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    collect_ignore_glob = ["*.py"]
else:
    # Every simulated GPU thread is a Python thread; a short switch interval lets them pass
    # cuda.syncthreads() barriers quickly.
    sys.setswitchinterval(1e-4)

    def _atomic_shared_arrays():
        """Make the simulator's ``cuda.shared.array`` allocation thread-safe.

        The simulator keys a block's shared arrays by the calling source line and creates
        one on first use with an unlocked check-then-set: two threads reaching the line at
        once can each get their own array, so one thread's writes are invisible to the
        others (seen as rare wrong 8-bit codes when a table copy was split). Same keys and
        arrays, under a lock.
        """
        import numpy as np
        from numba.cuda.simulator import kernelapi

        types, numpy_support = kernelapi.types, kernelapi.numpy_support

        original = kernelapi.FakeCUDAShared.array
        lock = threading.Lock()

        def array(self, shape, dtype, alignment=None):
            if shape == 0 or alignment is not None:  # dynamic shared memory, or an error
                return original(self, shape, dtype, alignment)
            if isinstance(dtype, types.Type):
                dtype = numpy_support.as_dtype(dtype)
            caller = sys._getframe(1)
            key = (caller.f_code.co_filename, caller.f_lineno)
            with lock:
                res = self._allocations.get(key)
                if res is None:
                    res = self._allocations[key] = np.empty(shape, dtype)
            return res

        kernelapi.FakeCUDAShared.array = array

    _atomic_shared_arrays()
