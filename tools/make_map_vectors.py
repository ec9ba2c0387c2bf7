"""Write tests/vectors/dynamic_maps.npz: bitsandbytes' dynamic maps as PyTorch computes them.

Run once, with torch installed: ``python tools/make_map_vectors.py``. The tests read the file
without torch.

bitsandbytes builds its maps (``create_dynamic_map``) with float32 ``torch.linspace`` and
float32 tensor arithmetic, on the CPU. PyTorch's linspace kernel gives slightly different
float32 values depending on the CPU kernel it dispatches to: the vectorized AVX2/AVX-512
builds fuse ``start + step * k`` into one multiply-add, the non-vectorized "default" one rounds
twice. So this script computes the maps twice, each in a child process with its own
``ATEN_CPU_CAPABILITY``, and stores

- ``signed``, ``unsigned``: from the AVX2/AVX-512 kernel, what bitsandbytes users on x86-64
  get and what ``adamnp.quant.dynamic_map`` reproduces;
- ``signed_default``, ``unsigned_default``: from PyTorch's default kernel, for reference;
- ``capabilities``: the kernel names PyTorch reported for the two runs.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "dynamic_maps.npz"


def torch_dynamic_map(signed):
    """The construction of ``create_dynamic_map(signed, 7, 8)``, in float32 torch ops."""
    import torch

    values = []
    for i in range(7):
        n = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10 ** (i - 6) * means).tolist()  # python scalar: cast to float32 by torch
        if signed:
            values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    out = torch.tensor(values, dtype=torch.float32).numpy()
    assert out.shape == (256,)
    return out


def _child(path):
    import torch

    np.savez(
        path,
        signed=torch_dynamic_map(True),
        unsigned=torch_dynamic_map(False),
        capability=np.array(torch.backends.cpu.get_cpu_capability()),
    )


def _run(capability):
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "maps.npz")
        subprocess.run([sys.executable, __file__, "--child", path], env=env, check=True)
        with np.load(path) as f:
            return {k: f[k] for k in f.files}


def main():
    best = _run(None)
    if str(best["capability"]) not in ("AVX2", "AVX512"):
        sys.exit(f"need a CPU where PyTorch runs its AVX2/AVX512 kernels, got {best['capability']}")
    default = _run("default")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        OUT,
        signed=best["signed"],
        unsigned=best["unsigned"],
        signed_default=default["signed"],
        unsigned_default=default["unsigned"],
        capabilities=np.array([str(best["capability"]), str(default["capability"])]),
    )
    for key in ("signed", "unsigned"):
        diff = np.count_nonzero(best[key] != default[key])
        print(f"{key}: {diff} of 256 values differ between the two kernels")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
    else:
        main()
