"""adamnp: Adam and AdamW for plain arrays, with NumPy, Numba-CPU and Numba-CUDA backends.

The whole public surface is re-exported here; everything else is private or a backend.

Examples
--------
>>> import numpy as np, adamnp
>>> params = {"w": np.zeros(4, np.float32)}
>>> state = adamnp.init(params, adamnp.adamw(lr=0.1), backend="numpy")
>>> adamnp.step(params, {"w": np.ones(4, np.float32)}, state)
>>> params["w"].round(6)  # the first step moves each element by lr against the gradient
array([-0.1, -0.1, -0.1, -0.1], dtype=float32)
"""

from . import quant, schedules
from ._api import init, step
from ._checkpoint import CheckpointError, load_state, load_state_dict, save_state, state_dict
from ._config import AdamConfig, adam, adamw
from ._convert import convert_state
from ._groups import configure
from ._state import AdamState, Fp32Slot, QuantSlot
from .quant import dequantize_blockwise, dynamic_map, quantize_blockwise

__version__ = "0.1.0"


def __getattr__(name: str):
    # adamnp.scipy imports scipy.optimize; load it on first use so `import adamnp` stays light.
    if name == "scipy":
        import importlib

        return importlib.import_module(".scipy", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdamConfig",
    "AdamState",
    "CheckpointError",
    "Fp32Slot",
    "QuantSlot",
    "adam",
    "adamw",
    "configure",
    "convert_state",
    "dequantize_blockwise",
    "dynamic_map",
    "init",
    "load_state",
    "load_state_dict",
    "quant",
    "quantize_blockwise",
    "save_state",
    "schedules",
    "state_dict",
    "step",
]
