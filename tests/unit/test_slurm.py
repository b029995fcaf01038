"""Launching under a bare `srun`: hostlist expansion and the order of process set-up."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from megatron_keye.runtime import parallel
from megatron_keye.runtime.parallel import expand_hostlist, slurm_hostnames


@pytest.mark.parametrize("hostlist,hosts", [
    ("login1", ["login1"]),
    ("node[01-04]", ["node01", "node02", "node03", "node04"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("node[08-11]", ["node08", "node09", "node10", "node11"]),
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ("gpu-a[01-03,07],gpu-b[10-11],login1",
     ["gpu-a01", "gpu-a02", "gpu-a03", "gpu-a07", "gpu-b10", "gpu-b11", "login1"]),
    ("a,b[2,5],c", ["a", "b2", "b5", "c"]),
    ("rack[1-2]-n[3-4]", ["rack1-n3", "rack1-n4", "rack2-n3", "rack2-n4"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
    ("[1-2]x", ["1x", "2x"]),
    ("node[7]", ["node7"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist,message", [
    ("", "empty"),
    ("node[01-03", "'[' without ']'"),
    ("node01]", "']' without '['"),
    ("node[[1-2]]", "nested"),
    ("node[a-c]", "cannot read the range 'a-c'"),
    ("node[1-]", "cannot read the range '1-'"),
    ("node[]", "cannot read the range ''"),
    ("node[5-3]", "backwards"),
    ("a,,b", "empty host name"),
])
def test_bad_hostlists_are_refused_by_name(hostlist, message):
    with pytest.raises(ValueError, match="hostlist") as err:
        expand_hostlist(hostlist)
    assert message in str(err.value)


@pytest.fixture
def clean_env(monkeypatch):
    """Restore os.environ exactly (the code under test writes it directly)."""
    saved = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_LOCALID",
                "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_NODELIST"):
        os.environ.pop(key, None)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


def _no_scontrol(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))


def _fake_scontrol(monkeypatch, tmp_path, hosts: list[str]):
    """An `scontrol` on PATH that prints `hosts` for `show hostnames` and logs its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    log = tmp_path / "scontrol.args"
    script.write_text("#!/bin/sh\n"
                      f'echo "$@" > {log}\n'
                      + "".join(f"echo {h}\n" for h in hosts))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return log


def test_slurm_hostnames_asks_scontrol_when_present(monkeypatch, tmp_path):
    log = _fake_scontrol(monkeypatch, tmp_path, ["alpha", "beta"])
    assert slurm_hostnames("whatever[1-2]") == ["alpha", "beta"]
    assert log.read_text().split() == ["show", "hostnames", "whatever[1-2]"]


def test_slurm_hostnames_falls_back_when_scontrol_fails(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text("#!/bin/sh\necho 'slurm_load_ctl_conf error' >&2\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert slurm_hostnames("gpu[09-10]") == ["gpu09", "gpu10"]


def test_master_is_the_first_node_of_the_step(clean_env, monkeypatch, tmp_path):
    _no_scontrol(monkeypatch, tmp_path)
    clean_env.update(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0",
                     SLURM_JOB_NODELIST="node[01-08]", SLURM_STEP_NODELIST="node[05-06]")
    parallel._env_from_slurm()
    assert clean_env["MASTER_ADDR"] == "node05"
    assert clean_env["RANK"] == "0" and clean_env["WORLD_SIZE"] == "2"


def test_slurm_hostnames_parses_without_scontrol(monkeypatch, tmp_path):
    _no_scontrol(monkeypatch, tmp_path)
    assert slurm_hostnames("gpu[09-10],cpu1") == ["gpu09", "gpu10", "cpu1"]


def test_srun_without_torchrun_sets_env_before_choosing_the_device(clean_env, monkeypatch,
                                                                   tmp_path):
    """Each task takes the GPU of its SLURM_LOCALID, and MASTER_ADDR is the first full host."""
    _no_scontrol(monkeypatch, tmp_path)
    clean_env.update(SLURM_PROCID="13", SLURM_NTASKS="16", SLURM_LOCALID="5",
                     SLURM_JOB_NODELIST="gpu-a[07-08],gpu-b[10-11]")
    events = []

    def set_device(device):
        events.append(("set_device", torch.device(device).index, dict(os.environ)))

    def init_process_group(backend, timeout):
        events.append(("init_process_group", backend, dict(os.environ)))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel.dist, "init_process_group", init_process_group)
    monkeypatch.setattr(parallel.cpu_compat, "apply", lambda: False)
    monkeypatch.setattr(parallel.mcore_fallback, "apply", lambda: None)

    device = parallel.init_distributed()

    assert device == torch.device("cuda", 5)
    assert [e[0] for e in events] == ["set_device", "init_process_group"]
    _, index, env_at_set_device = events[0]
    assert index == 5
    # The environment was complete when the device was chosen.
    assert env_at_set_device["LOCAL_RANK"] == "5"
    assert env_at_set_device["RANK"] == "13" and env_at_set_device["WORLD_SIZE"] == "16"
    assert env_at_set_device["MASTER_ADDR"] == "gpu-a07"
    assert events[1][1] == "nccl"


def test_one_gpu_per_task_binding_takes_the_only_visible_device(clean_env, monkeypatch):
    """`srun --gpus-per-task=1` leaves one visible GPU: device 0 whatever SLURM_LOCALID is."""
    clean_env.update(LOCAL_RANK="3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert parallel.compute_device() == torch.device("cuda", 0)


def test_torchrun_environment_wins_over_slurm(clean_env, monkeypatch, tmp_path):
    _no_scontrol(monkeypatch, tmp_path)
    clean_env.update(RANK="2", WORLD_SIZE="4", LOCAL_RANK="2", MASTER_ADDR="head",
                     MASTER_PORT="1234", SLURM_PROCID="0", SLURM_LOCALID="0",
                     SLURM_JOB_NODELIST="other[1-2]")
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel.dist, "init_process_group", lambda **kwargs: None)
    monkeypatch.setattr(parallel.cpu_compat, "apply", lambda: False)
    monkeypatch.setattr(parallel.mcore_fallback, "apply", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parallel.init_distributed()
    assert os.environ["MASTER_ADDR"] == "head" and os.environ["RANK"] == "2"
