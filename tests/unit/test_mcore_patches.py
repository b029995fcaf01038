"""The megatron-core version guard and the optimizer-step placement after a load."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_keye import mcore_version
from megatron_keye.mcore_version import (
    ALLOW_ENV,
    SUPPORTED_MCORE_VERSION,
    UnsupportedMcoreVersion,
    require_supported_mcore,
)
from megatron_keye.runtime.mcore_fallback import match_step_devices, own_step_counters


def test_installed_megatron_core_is_the_supported_one():
    assert mcore_version.installed_mcore_version() == SUPPORTED_MCORE_VERSION
    assert require_supported_mcore("test") is True


def test_other_version_fails_with_both_versions_named(monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(UnsupportedMcoreVersion) as err:
        require_supported_mcore("megatron_keye.runtime.cpu_compat", version="0.17.0")
    text = str(err.value)
    assert "cpu_compat" in text and "0.17.0" in text and SUPPORTED_MCORE_VERSION in text
    assert ALLOW_ENV in text


def test_escape_hatch_downgrades_to_a_warning(monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "1")
    with pytest.warns(RuntimeWarning, match="0.17.0"):
        assert require_supported_mcore("x", version="0.17.0") is False
    monkeypatch.setenv(ALLOW_ENV, "0")
    with pytest.raises(UnsupportedMcoreVersion):
        require_supported_mcore("x", version="0.17.0")


@pytest.mark.parametrize("module", ["cpu_compat", "mcore_fallback", "inputs"])
def test_every_patch_checks_the_version(monkeypatch, module):
    """Each patching module asks the guard before it touches megatron-core."""
    from megatron_keye.runtime import cpu_compat, mcore_fallback

    monkeypatch.delenv(ALLOW_ENV, raising=False)
    monkeypatch.setattr(mcore_version, "installed_mcore_version", lambda: "0.99.0")
    if module == "cpu_compat":
        monkeypatch.setattr(cpu_compat, "needed", lambda: True)
        monkeypatch.setattr(cpu_compat, "_APPLIED", False)
        # Patching must not start: the first shim would replace torch.cuda.current_device.
        original = torch.cuda.current_device
        with pytest.raises(UnsupportedMcoreVersion, match="cpu_compat"):
            cpu_compat.apply()
        assert torch.cuda.current_device is original
    elif module == "mcore_fallback":
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        monkeypatch.setattr(mcore_fallback, "in_use", lambda: True)
        monkeypatch.setattr(mcore_fallback, "_APPLIED", False)
        original = DistributedOptimizer.load_state_dict
        with pytest.raises(UnsupportedMcoreVersion, match="mcore_fallback"):
            mcore_fallback.apply()
        assert DistributedOptimizer.load_state_dict is original
    else:
        # At import, in a fresh interpreter (reloading here would leave two AttentionInputs).
        code = ("import megatron.core.package_info as info; info.__version__ = '0.99.0'; "
                "import megatron_keye.ops.attention.inputs")
        env = {k: v for k, v in os.environ.items() if k != ALLOW_ENV}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode != 0
        assert "UnsupportedMcoreVersion" in done.stderr and "PackedSeqParams" in done.stderr


def _torch_adamw_part(device: str, *, fused: bool, n: int = 3):
    """A megatron-like optimizer part around a torch AdamW whose steps sit on the CPU."""
    params = [torch.nn.Parameter(torch.zeros(4, device=device)) for _ in range(n)]
    inner = torch.optim.AdamW(params, lr=1e-3)
    shared = torch.tensor(7.0)  # megatron restores one CPU step shared by every parameter
    for p in params:
        inner.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p),
                          "step": shared}
    for group in inner.param_groups:
        group.update(fused=fused, foreach=False)  # as optim._use_fused_torch_adamw does
    return SimpleNamespace(optimizer=inner), params


def test_fused_steps_move_to_the_parameters_device():
    """'meta' stands in for a GPU: the fused kernel needs the step beside the parameter."""
    part, params = _torch_adamw_part("meta", fused=True)
    assert match_step_devices(part) == len(params)
    for p in params:
        step = part.optimizer.state[p]["step"]
        assert step.device == p.device and step.dtype == torch.float32
    assert match_step_devices(part) == 0  # idempotent


def test_plain_adamw_steps_stay_on_the_cpu():
    part, params = _torch_adamw_part("meta", fused=False)
    assert match_step_devices(part) == 0
    assert all(part.optimizer.state[p]["step"].device.type == "cpu" for p in params)


def test_after_a_load_each_parameter_owns_its_step_on_its_device():
    part, params = _torch_adamw_part("meta", fused=True)
    own_step_counters(part)
    steps = [part.optimizer.state[p]["step"] for p in params]
    assert all(s.device == p.device for s, p in zip(steps, params))
    assert len({id(s) for s in steps}) == len(steps)
    # On the CPU (the test machine's real path) steps are unshared but stay where they are.
    cpu_part, cpu_params = _torch_adamw_part("cpu", fused=True)
    own_step_counters(cpu_part)
    cpu_steps = [cpu_part.optimizer.state[p]["step"] for p in cpu_params]
    cpu_steps[0].add_(1)
    assert [float(s) for s in cpu_steps] == [8.0, 7.0, 7.0]
