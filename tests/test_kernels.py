"""The reference kernel routing: which functions mamba-ssm ends up calling on CPU, and that they compute the right thing."""
import importlib
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from kotomamba import kernels
from kotomamba.kernels import (
    NO_REFERENCE,
    REFERENCE_ROUTING,
    KernelRoutingError,
    KernelsUnavailableError,
    configure_triton_cache,
    kernel_backend,
    select_kernel_backend,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="these tests exercise the CPU reference backend")


@pytest.fixture(scope="module", autouse=True)
def reference_backend():
    assert select_kernel_backend("cpu") == "reference"


def test_backend_reports_reference_and_import_works():
    import mamba_ssm

    assert kernel_backend() == "reference"
    assert mamba_ssm.MambaLMHeadModel is not None


def test_every_routed_name_is_bound_to_its_replacement():
    for module_name, attribute, replacement in REFERENCE_ROUTING:
        bound = getattr(importlib.import_module(module_name), attribute)
        if replacement == NO_REFERENCE:
            with pytest.raises(KernelRoutingError, match=f"{module_name}.{attribute} has no pure-PyTorch reference"):
                bound()
        else:
            replacement_module, replacement_name = replacement.split(":")
            assert bound is getattr(importlib.import_module(replacement_module), replacement_name), attribute


def test_stand_in_extension_raises_clear_error_when_called():
    stand_in = sys.modules["selective_scan_cuda"]
    with pytest.raises(KernelRoutingError, match=r"selective_scan_cuda\.fwd was called.*missed"):
        stand_in.fwd(torch.zeros(1))
    assert not hasattr(stand_in, "__file__")


def test_gpu_without_kernels_refuses_unless_allowed(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_cuda_extensions_importable", lambda: False)
    with caplog.at_level(logging.WARNING, logger="kotomamba.kernels"):
        with pytest.raises(KernelsUnavailableError, match="not importable"):
            select_kernel_backend("cuda")
    assert "pip install" in caplog.text and "WARNING" in caplog.text
    assert select_kernel_backend("cuda", allow_reference_on_gpu=True) == "reference"


def test_switching_backend_after_install_is_refused(monkeypatch):
    monkeypatch.setattr(kernels, "_cuda_extensions_importable", lambda: True)
    with pytest.raises(KernelRoutingError, match="already installed"):
        select_kernel_backend("cuda")


def test_mamba1_mixer_equals_hand_assembled_reference_scan():
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref
    from mamba_ssm.modules.mamba_simple import Mamba
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    torch.manual_seed(0)
    mixer = Mamba(d_model=16, d_state=8, layer_idx=0)
    hidden = torch.randn(2, 11, 16)
    routed = mixer(hidden)

    xz = rearrange(mixer.in_proj(hidden), "b l d -> b d l")
    x, z = xz.chunk(2, dim=1)
    x = causal_conv1d_ref(x, rearrange(mixer.conv1d.weight, "d 1 w -> d w"), mixer.conv1d.bias, activation="silu")
    x_dbl = mixer.x_proj(rearrange(x, "b d l -> b l d"))
    dt, B, C = torch.split(x_dbl, [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    dt = rearrange(dt @ mixer.dt_proj.weight.t(), "b l d -> b d l")
    y = selective_scan_ref(x, dt, -torch.exp(mixer.A_log), rearrange(B, "b l n -> b n l"),
                           rearrange(C, "b l n -> b n l"), mixer.D, z=z, delta_bias=mixer.dt_proj.bias,
                           delta_softplus=True)
    expected = mixer.out_proj(rearrange(y, "b d l -> b l d"))
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-6)


def _ssd_inputs(batch=2, seqlen=24, nheads=4, headdim=8, ngroups=2, dstate=6):
    torch.manual_seed(1)
    x = torch.randn(batch, seqlen, nheads, headdim)
    dt = torch.randn(batch, seqlen, nheads) - 1
    A = -torch.rand(nheads) - 0.5
    B = torch.randn(batch, seqlen, ngroups, dstate)
    C = torch.randn(batch, seqlen, ngroups, dstate)
    return x, dt, A, B, C


def test_chunk_scan_reference_equals_mamba_ssm_chunked_reference():
    from mamba_ssm.ops.triton.ssd_combined import ssd_chunk_scan_combined_ref

    x, dt, A, B, C = _ssd_inputs()
    D, z, dt_bias = torch.randn(4), torch.randn_like(x), torch.randn(4)
    ours = kernels.mamba_chunk_scan_combined_reference(x, dt, A, B, C, 8, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    theirs = ssd_chunk_scan_combined_ref(x, dt, A, B, C, 8, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_chunk_scan_reference_final_state_continues_the_scan():
    x, dt, A, B, C = _ssd_inputs(seqlen=21)
    full = kernels.mamba_chunk_scan_combined_reference(x, dt, A, B, C, 8, dt_softplus=True)
    first, state = kernels.mamba_chunk_scan_combined_reference(
        x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], 8, dt_softplus=True, return_final_states=True)
    second = kernels.mamba_chunk_scan_combined_reference(
        x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], 8, dt_softplus=True, initial_states=state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=1e-4, atol=1e-5)


def test_split_conv1d_scan_reference_equals_mamba_ssm_reference():
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_ref

    torch.manual_seed(2)
    batch, seqlen, nheads, headdim, dstate = 2, 19, 3, 8, 5
    dim = nheads * headdim
    zxbcdt = torch.randn(batch, seqlen, 2 * dim + 2 * dstate + nheads)
    conv_weight, conv_bias = torch.randn(dim + 2 * dstate, 4) * 0.3, torch.randn(dim + 2 * dstate)
    dt_bias, A, D = torch.randn(nheads), -torch.rand(nheads) - 0.5, torch.randn(nheads)
    norm_weight, out_weight = torch.rand(dim) + 0.5, torch.randn(7, dim)
    arguments = dict(rmsnorm_weight=norm_weight, rmsnorm_eps=1e-5, outproj_weight=out_weight, headdim=headdim,
                     norm_before_gate=False)
    ours = kernels.mamba_split_conv1d_scan_combined_reference(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, 8,
                                                              **arguments)
    theirs = mamba_split_conv1d_scan_ref(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, 8, **arguments)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_layer_norm_fn_reference_keeps_kernel_dtypes_and_values():
    from mamba_ssm.ops.triton.layer_norm import rms_norm_ref

    torch.manual_seed(3)
    x, weight = torch.randn(3, 5, 16, dtype=torch.bfloat16), torch.rand(16) + 0.5
    normed, residual = kernels.layer_norm_fn_reference(x, weight, None, prenorm=True, residual_in_fp32=True,
                                                       is_rms_norm=True, eps=1e-5)
    assert normed.dtype == torch.bfloat16 and residual.dtype == torch.float32
    torch.testing.assert_close(residual, x.float())
    expected = rms_norm_ref(x.float(), weight, None, eps=1e-5).to(torch.bfloat16)
    torch.testing.assert_close(normed, expected)
    second, residual2 = kernels.layer_norm_fn_reference(x, weight, None, residual=residual, prenorm=True,
                                                        is_rms_norm=True, eps=1e-5)
    torch.testing.assert_close(residual2, x.float() * 2)
    torch.testing.assert_close(second, expected)


def test_flash_attn_kvcache_reference_matches_full_causal_attention():
    torch.manual_seed(4)
    batch, seqlen, heads, kv_heads, head_dim = 2, 6, 4, 2, 8
    q = torch.randn(batch, seqlen, heads, head_dim)
    k, v = torch.randn(batch, seqlen, kv_heads, head_dim), torch.randn(batch, seqlen, kv_heads, head_dim)
    full = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
        is_causal=True).transpose(1, 2)
    k_cache, v_cache = torch.zeros(batch, 10, kv_heads, head_dim), torch.zeros(batch, 10, kv_heads, head_dim)
    k_cache[:, :5], v_cache[:, :5] = k[:, :5], v[:, :5]
    last = kernels.flash_attn_with_kvcache_reference(q[:, 5:], k_cache, v_cache, k[:, 5:], v[:, 5:],
                                                     cache_seqlens=5, causal=True)
    torch.testing.assert_close(last, full[:, 5:])
    torch.testing.assert_close(k_cache[:, 5], k[:, 5])


def test_mamba3_has_no_reference_and_says_so():
    from mamba_ssm.modules.mamba3 import Mamba3

    torch.manual_seed(5)
    mixer = Mamba3(d_model=32, d_state=16, headdim=16, layer_idx=0)
    with pytest.raises(KernelRoutingError, match="mamba3_siso_combined has no pure-PyTorch reference"):
        mixer(torch.randn(1, 4, 32))


def test_unsupported_kernel_argument_is_refused():
    x, dt, A, B, C = _ssd_inputs()
    with pytest.raises(KernelRoutingError, match="seq_idx"):
        kernels.mamba_chunk_scan_combined_reference(x, dt, A, B, C, 8, seq_idx=torch.zeros(2, 24, dtype=torch.int32))


def test_triton_cache_per_rank(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    configure_triton_cache(3)
    expected = tmp_path / ".triton" / "cache" / "rank_3"
    assert kernels.os.environ["TRITON_CACHE_DIR"] == str(expected) and expected.is_dir()
    configure_triton_cache(3)
    assert kernels.os.environ["TRITON_CACHE_DIR"] == str(expected)

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "shared"))
    configure_triton_cache(0)
    assert kernels.os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "shared" / "rank_0")

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine" / "rank_1"))
    configure_triton_cache(1)
    assert kernels.os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine" / "rank_1")
