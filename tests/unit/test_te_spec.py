"""attention_backend=te: the layer is megatron-core's own GPT/Qwen3 TE spec and its MLP computes
SwiGLU with the right width into linear_fc2. TransformerEngine is absent on CPU, so its classes
are stood in for by stubs (spec structure) or by megatron-core's local layers (MLP math)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron_keye.config import load_config
from megatron_keye.models.keye_vl.language import transformer_config
from megatron_keye.models.keye_vl.specs import decoder_block_spec, uses_spec_activation


class TEActivationStandIn(torch.nn.Module):
    """Where megatron-core's spec would put TE's activation op (must not appear for Qwen3)."""

    def __init__(self, config):
        raise AssertionError("the TE layer spec must not carry an activation module")


def _role(name: str) -> type:
    return type(name, (), {})


class StubTESpecProvider:
    """megatron-core's TESpecProvider with a distinct stand-in class per role."""

    linear_cls = _role("TELinear")
    column_cls = _role("TEColumnParallelLinear")
    row_cls = _role("TERowParallelLinear")
    norm_linear_cls = _role("TELayerNormColumnParallelLinear")
    norm_cls = _role("TENorm")
    attention_cls = _role("TEDotProductAttention")

    def linear(self):
        return self.linear_cls

    def column_parallel_linear(self):
        return self.column_cls

    def row_parallel_linear(self):
        return self.row_cls

    def fuse_layernorm_and_linear(self):
        return True

    def column_parallel_layer_norm_linear(self):
        return self.norm_linear_cls

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False):
        return self.norm_cls

    def core_attention(self):
        return self.attention_cls

    def activation_func(self):
        return TEActivationStandIn


class LocalLinearsProvider(StubTESpecProvider):
    """The same spec with megatron-core's local TP linears in the linear roles (runs on CPU)."""

    norm_linear_cls = ColumnParallelLinear
    row_cls = RowParallelLinear


def _install_stub_te(monkeypatch_or_none, provider=StubTESpecProvider):
    values = {"HAVE_TE": True, "TESpecProvider": provider, "TENorm": provider.norm_cls}
    for name, value in values.items():
        if monkeypatch_or_none is None:
            setattr(gpt_layer_specs, name, value)
        else:
            monkeypatch_or_none.setattr(gpt_layer_specs, name, value, raising=False)


@pytest.fixture(autouse=True)
def first_stage(monkeypatch):
    """Specs for pipeline rank 0 without process groups (a world of one)."""
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_rank", lambda: 0)


def _tconfig(backend: str, *extra: str):
    cfg = load_config(None, [f"model.attention_backend={backend}", *extra])
    return transformer_config(cfg.model, cfg.parallel)


def test_te_block_spec_is_megatron_cores_own(monkeypatch):
    _install_stub_te(monkeypatch)
    config = _tconfig("te")
    ours = decoder_block_spec(config, attention_backend="te", vp_stage=None)
    theirs = gpt_layer_specs.get_gpt_decoder_block_spec(
        config, use_transformer_engine=True, vp_stage=None, pp_rank=0
    )
    assert ours == theirs
    mlp = ours.layer_specs[0].submodules.mlp
    assert mlp.submodules.activation_func is None
    assert not config.use_te_activation_func  # so the MLP applies its gated SiLU itself
    attn = ours.layer_specs[0].submodules.self_attention.submodules
    assert attn.q_layernorm is attn.k_layernorm is StubTESpecProvider.norm_cls


def test_local_spec_takes_its_swiglu_module():
    config = _tconfig("sdpa")
    assert config.use_te_activation_func and uses_spec_activation("sdpa")
    from megatron_keye.ops.swiglu import SwiGLU

    spec = decoder_block_spec(config, attention_backend="sdpa", vp_stage=None)
    assert spec.layer_specs[0].submodules.mlp.submodules.activation_func is SwiGLU


def test_a_config_that_does_not_fit_the_spec_is_refused(monkeypatch):
    _install_stub_te(monkeypatch)
    te_with_switch = dataclasses.replace(_tconfig("te"), use_te_activation_func=True)
    with pytest.raises(ValueError, match="use_te_activation_func"):
        decoder_block_spec(te_with_switch, attention_backend="te", vp_stage=None)
    local_without = dataclasses.replace(_tconfig("sdpa"), use_te_activation_func=False)
    with pytest.raises(ValueError, match="use_te_activation_func"):
        decoder_block_spec(local_without, attention_backend="sdpa", vp_stage=None)


def test_te_without_transformer_engine_says_so(monkeypatch):
    monkeypatch.setattr(gpt_layer_specs, "HAVE_TE", False)
    with pytest.raises(ImportError, match="TransformerEngine"):
        decoder_block_spec(_tconfig("te"), attention_backend="te", vp_stage=None)


def _mlp_worker(*, backend: str) -> dict:
    """Build the backend's MLP from its spec (TE linears → local ones) and run it once."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.spec_utils import build_module

    from megatron_keye.runtime.parallel import init_distributed

    init_distributed()
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    _install_stub_te(None, LocalLinearsProvider)
    config = _tconfig(backend)
    spec = decoder_block_spec(config, attention_backend=backend, vp_stage=None)
    mlp = build_module(spec.layer_specs[0].submodules.mlp, config=config,
                       ffn_hidden_size=config.ffn_hidden_size)
    widths = []
    mlp.linear_fc2.register_forward_pre_hook(lambda _m, args: widths.append(args[0].shape[-1]))
    x = torch.randn(5, 2, config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, bias = mlp(x)
        ffn = config.ffn_hidden_size
        w1, w2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
        reference = (F.silu(x @ w1[:ffn].T) * (x @ w1[ffn:].T)) @ w2.T
    return {"widths": widths, "ffn": ffn, "bias": bias, "out": out, "reference": reference,
            "fc1_out": w1.shape[0]}


@pytest.mark.parametrize("backend", ["te", "sdpa"])
def test_mlp_from_the_spec_computes_swiglu(backend):
    from megatron_keye.testing.distributed import run_workers

    (r,) = run_workers(_mlp_worker, 1, timeout=180, backend=backend)
    assert r["fc1_out"] == 2 * r["ffn"]
    assert r["widths"] == [r["ffn"]], "linear_fc2 takes ffn_hidden_size features"
    assert r["bias"] is None
    torch.testing.assert_close(r["out"], r["reference"], rtol=1e-5, atol=1e-6)
