"""The released keye-vl-utils 1.5.2, imported as a test oracle and benchmark peer.

keye-vl-utils imports torchvision at module level but never uses it on the video/SlowFast path,
and PyPI's torchvision does not import beside the CPU torch wheel. Small stand-in modules are
placed in `sys.modules` only for the duration of the import (the imported module keeps its own
references), so nothing else in the process sees a fake torchvision. Never imported by the package.
"""

from __future__ import annotations

import importlib
import sys
import types

INSTALL_HINT = "pip install opencv-python-headless keye-vl-utils==1.5.2 einops"
MODULE = "keye_vl_utils.vision_process"


def _torchvision_stand_ins() -> dict[str, types.ModuleType]:
    torchvision = types.ModuleType("torchvision")
    io_module = types.ModuleType("torchvision.io")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.InterpolationMode = types.SimpleNamespace(
        NEAREST="nearest", BILINEAR="bilinear", BICUBIC="bicubic", LANCZOS="lanczos"
    )
    torchvision.io, torchvision.transforms = io_module, transforms
    return {
        "torchvision": torchvision,
        "torchvision.io": io_module,
        "torchvision.transforms": transforms,
    }


def import_vision_process() -> types.ModuleType:
    """`keye_vl_utils.vision_process` (raises ImportError when it or OpenCV is missing)."""
    if MODULE in sys.modules:
        return sys.modules[MODULE]
    stubs = _torchvision_stand_ins()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        return importlib.import_module(MODULE)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
