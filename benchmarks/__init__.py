"""asv benchmarks of adamnp (run from the repository root; see benchmarks/README.md)."""

import os

# The suite times compiled steps from the first on: no NumPy steps while kernels compile
# (adamnp._background). bench_first_use sets it for its own processes.
os.environ.setdefault("ADAMNP_BACKGROUND_COMPILE", "0")
