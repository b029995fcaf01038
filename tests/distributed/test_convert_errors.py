"""Errors of `convert` and of spawned ranks come back as one line naming what to fix."""

from __future__ import annotations

import json
import time

import pytest
import torch

from megatron_keye import cli
from megatron_keye.runtime.spawn import RankError, spawn_ranks


def _fail_on_rank_one(*, message: str):
    import torch.distributed as dist

    dist.init_process_group("gloo")  # the rendezvous spawn_ranks set up
    if dist.get_rank() == 1:
        raise KeyError(message)
    dist.barrier()  # rank 0 waits here until it is killed
    return "unreachable"


def _sleep(*, seconds: float):
    time.sleep(seconds)


def _die_silently():
    import os

    os._exit(3)


def test_a_failing_rank_is_one_exception_and_the_others_are_killed():
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        spawn_ranks(_fail_on_rank_one, 2, timeout=120, message="tensor 'x' is missing")
    err = info.value
    assert str(err) == ("_fail_on_rank_one failed on rank 1 of 2: KeyError: tensor 'x' is "
                        "missing")
    assert err.rank == 1 and err.error_type == "KeyError"
    assert "Traceback" in err.remote_traceback and "_fail_on_rank_one" in err.remote_traceback
    assert time.monotonic() - start < 60  # rank 0 was killed, not waited for


def test_a_rank_that_dies_without_a_report_is_noticed_before_the_timeout():
    start = time.monotonic()
    with pytest.raises(RankError, match="_die_silently failed on rank 0 of 1: died: exit code 3"):
        spawn_ranks(_die_silently, 1, timeout=300)
    assert time.monotonic() - start < 60


def test_a_rank_past_the_timeout_is_killed():
    with pytest.raises(TimeoutError, match="_sleep on 1 ranks: no result within 3s"):
        spawn_ranks(_sleep, 1, timeout=3, seconds=120)


def _one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_convert_import_of_a_missing_directory(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    err = _one_line_error(capsys, ["convert", "import", "--hf-dir", str(missing),
                                   "--out", str(tmp_path / "out")])
    assert err == f"error: {missing}: no such directory (expected a Hugging Face model)"


def test_convert_import_without_config_json(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    err = _one_line_error(capsys, ["convert", "import", "--hf-dir", str(tmp_path / "hf"),
                                   "--out", str(tmp_path / "out")])
    assert err == f"error: {tmp_path / 'hf' / 'config.json'}: not found (a Qwen3 config.json is required)"


def test_convert_import_of_a_layout_the_model_cannot_take(tmp_path, capsys):
    from megatron_keye.config import load_config
    from megatron_keye.models.keye_vl.hf_adapter import hf_config_dict

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config_dict(load_config().model)))
    err = _one_line_error(capsys, ["convert", "import", "--hf-dir", str(tmp_path / "hf"),
                                   "--out", str(tmp_path / "out"), "--tensor", "3"])
    assert err.startswith("error: parallel.tensor: 3 does not divide")
    err = _one_line_error(capsys, ["convert", "import", "--hf-dir", str(tmp_path / "hf"),
                                   "--out", str(tmp_path / "out")])
    assert err.startswith(f"error: {tmp_path / 'hf'}: no *.safetensors files")


def test_convert_export_of_a_missing_checkpoint(tmp_path, capsys):
    err = _one_line_error(capsys, ["convert", "export", "--checkpoint", str(tmp_path / "none"),
                                   "--out", str(tmp_path / "out")])
    assert err == f"error: {tmp_path / 'none'}: no checkpoint there (nor a `latest` naming one)"


def test_an_error_inside_an_import_rank_is_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    from megatron_keye.config import load_config
    from megatron_keye.models.keye_vl.hf_adapter import hf_config_dict

    model = load_config().model
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_config_dict(model)))
    save_file({"model.embed_tokens.weight": torch.zeros(model.vocab_size, model.hidden_size)},
              str(hf / "model.safetensors"))
    err = _one_line_error(capsys, ["convert", "import", "--hf-dir", str(hf),
                                   "--out", str(tmp_path / "out")])
    assert err.startswith("error: _import_rank failed on rank 0 of 1: KeyError: ")
    assert err.endswith(f"{hf}: tensor 'model.norm.weight' is missing from the safetensors files")
