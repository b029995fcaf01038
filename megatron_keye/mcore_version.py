"""The megatron-core version every patch of ours was written against, and the check they share.

`cpu_compat`, `mcore_fallback` and the `PackedSeqParams` subclass in `ops/attention/inputs.py`
reach into megatron-core internals by file and line. On another release those lines may have
moved or changed meaning, so each calls `require_supported_mcore(...)` before patching and stops
with a message naming the versions. `MEGATRON_KEYE_ALLOW_MCORE_VERSION=1` downgrades the error to
a warning (for someone deliberately trying a newer release).
"""

from __future__ import annotations

import os
import warnings

SUPPORTED_MCORE_VERSION = "0.16.1"
ALLOW_ENV = "MEGATRON_KEYE_ALLOW_MCORE_VERSION"


class UnsupportedMcoreVersion(RuntimeError):
    """megatron-core is not the release our patches were written for."""


def installed_mcore_version() -> str:
    """The version of the importable megatron-core (`megatron.core.package_info`)."""
    from megatron.core import package_info

    return str(package_info.__version__)


def require_supported_mcore(what: str, *, version: str | None = None) -> bool:
    """Check that megatron-core is SUPPORTED_MCORE_VERSION before `what` patches it.

    Returns True when the version matches. Otherwise raises UnsupportedMcoreVersion, or, with
    MEGATRON_KEYE_ALLOW_MCORE_VERSION=1 in the environment, warns and returns False.
    `version` overrides the detected version (for tests).
    """
    found = installed_mcore_version() if version is None else version
    if found == SUPPORTED_MCORE_VERSION:
        return True
    message = (
        f"{what} patches megatron-core {SUPPORTED_MCORE_VERSION} internals, but megatron-core "
        f"{found} is installed. Install megatron-core=={SUPPORTED_MCORE_VERSION}, or set "
        f"{ALLOW_ENV}=1 to run anyway at your own risk (the patched lines may have moved)."
    )
    if os.environ.get(ALLOW_ENV, "") not in ("", "0"):
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return False
    raise UnsupportedMcoreVersion(message)
