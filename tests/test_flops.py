"""Tests for kotomamba.flops against FLOPs worked out by hand, term by term."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kotomamba.flops import FlopsConfigError, flops_per_token, mfu, peak_flops


@dataclass
class Config:
    """Field names and defaults of mamba_ssm.models.config_mamba.MambaConfig."""

    d_model: int = 64
    d_intermediate: int = 0
    n_layer: int = 2
    vocab_size: int = 1001
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    pad_vocab_size_multiple: int = 8


LM_HEAD = 2 * 64 * 1008  # vocab 1001 padded to a multiple of 8


def test_tiny_mamba1_by_hand():
    # d_model 64, mamba-ssm defaults: expand 2 -> d_inner 128, d_state 16, d_conv 4, dt_rank ceil(64/16)=4
    in_proj = 2 * 64 * 256
    conv1d = 2 * 4 * 128
    x_proj = 2 * 128 * (4 + 16 + 16)
    dt_proj = 2 * 4 * 128
    scan = 7 * 128 * 16  # exp(dA) 2 + dB*x 1 + a*h+b 2 + C*h 2 per state element
    out_proj = 2 * 128 * 64
    layer = in_proj + conv1d + x_proj + dt_proj + scan + out_proj
    assert layer == 74752
    forward = 2 * layer + LM_HEAD
    assert flops_per_token(Config(), seq_length=128, include_backward=False) == forward
    assert flops_per_token(Config(), seq_length=128) == 3 * forward
    # explicit dt_rank and d_state
    custom = Config(ssm_cfg={"layer": "Mamba1", "d_state": 8, "dt_rank": 10, "expand": 1})
    custom_layer = 2 * 64 * 128 + 2 * 4 * 64 + 2 * 64 * (10 + 16) + 2 * 10 * 64 + 7 * 64 * 8 + 2 * 64 * 64
    assert flops_per_token(custom, 128, include_backward=False) == 2 * custom_layer + LM_HEAD


def test_tiny_mamba2_by_hand():
    ssm_cfg = {"layer": "Mamba2", "d_state": 16, "headdim": 32, "ngroups": 1, "chunk_size": 8}
    # d_inner 128, nheads 4, chunk 8
    in_proj = 2 * 64 * (2 * 128 + 2 * 1 * 16 + 4)
    conv1d = 2 * 4 * (128 + 2 * 16)
    chunk_scores = 2 * 16 * 8  # C.B^T over the full 8x8 chunk block, one group
    chunk_outputs = 2 * 128 * 8 / 2  # (CB*L).X on the causal half
    chunk_states = 2 * 128 * 16
    state_outputs = 2 * 128 * 16
    state_passing = 2 * 128 * 16 / 8
    out_proj = 2 * 128 * 64
    scan = chunk_scores + chunk_outputs + chunk_states + state_outputs + state_passing
    layer = in_proj + conv1d + scan + out_proj
    config = Config(ssm_cfg=ssm_cfg)
    assert flops_per_token(config, 64, include_backward=False) == pytest.approx(2 * layer + LM_HEAD)
    # a sequence shorter than the chunk only fills a 4x4 block
    short_scan = 2 * 16 * 4 + 2 * 128 * 4 / 2 + chunk_states + state_outputs + 2 * 128 * 16 / 4
    short = in_proj + conv1d + short_scan + out_proj
    assert flops_per_token(config, 4, include_backward=False) == pytest.approx(2 * short + LM_HEAD)


def test_tiny_mamba3_siso_by_hand():
    ssm_cfg = {"layer": "Mamba3", "d_state": 16}  # expand 2 -> d_inner 128, headdim 64 -> 2 heads
    # in_proj: z, x (2*128), B and C (2*16), dt / A / trap per head (3*2), rope angles 16*0.5/2 = 4
    in_proj = 2 * 64 * (256 + 32 + 6 + 4)
    # no conv1d; SSD with the default chunk 64 over a 128-token sequence
    scan = 2 * 16 * 64 + 2 * 128 * 64 / 2 + 2 * 128 * 16 + 2 * 128 * 16 + 2 * 128 * 16 / 64
    out_proj = 2 * 128 * 64
    config = Config(ssm_cfg=ssm_cfg)
    expected = 2 * (in_proj + scan + out_proj) + LM_HEAD
    assert flops_per_token(config, 128, include_backward=False) == pytest.approx(expected)


def test_gated_mlp_by_hand():
    # d_intermediate 100 rounds up to GatedMLP's multiple of 128
    mlp = 2 * 64 * 2 * 128 + 2 * 128 * 64
    with_mlp = Config(d_intermediate=100)
    difference = flops_per_token(with_mlp, 128, False) - flops_per_token(Config(), 128, False)
    assert difference == 2 * mlp


def test_attention_layer_by_hand():
    attn_cfg = {"num_heads": 4, "causal": True}  # head_dim 64/4 = 16
    config = Config(attn_layer_idx=[1], attn_cfg=attn_cfg, d_intermediate=128)
    mamba1_layer = 74752
    mlp = 2 * 64 * 256 + 2 * 128 * 64
    seq = 32
    qkv = 2 * 64 * (16 * (4 + 4 + 4))
    scores = 2 * 16 * 4 * seq / 2  # Q.K^T: causal -> seq/2 keys per query on average
    values = 2 * 16 * 4 * seq / 2
    out = 2 * 64 * 64
    attention = qkv + scores + values + out
    forward = mamba1_layer + attention + 2 * mlp + LM_HEAD
    assert flops_per_token(config, seq, include_backward=False) == pytest.approx(forward)
    # grouped-query attention (2 kv heads) without causal masking counts all seq keys
    gqa = Config(attn_layer_idx=[1], attn_cfg={"num_heads": 4, "num_heads_kv": 2}, d_intermediate=128)
    gqa_attention = 2 * 64 * (16 * (4 + 2 + 2)) + 2 * 2 * 16 * 4 * seq + out
    assert flops_per_token(gqa, seq, include_backward=False) == pytest.approx(
        mamba1_layer + gqa_attention + 2 * mlp + LM_HEAD
    )


def test_mamba1_2_8b_forward_is_about_twice_the_parameters():
    # state-spaces/mamba-2.8b: d_model 2560, 64 layers, vocab 50277 (padded to 50280), tied embeddings
    d, layers, d_inner, d_state, dt_rank, d_conv, vocab = 2560, 64, 5120, 16, 160, 4, 50280
    per_layer = (
        d * 2 * d_inner  # in_proj
        + d_inner * d_conv + d_inner  # conv1d weight and bias
        + d_inner * (dt_rank + 2 * d_state)  # x_proj
        + dt_rank * d_inner + d_inner  # dt_proj weight and bias
        + d_inner * d_state + d_inner  # A_log, D
        + d_inner * d  # out_proj
        + d  # norm
    )
    parameters = layers * per_layer + vocab * d + d
    assert 2.7e9 < parameters < 2.85e9
    config = Config(d_model=2560, n_layer=64, vocab_size=50277, ssm_cfg={"layer": "Mamba1"})
    forward = flops_per_token(config, 2048, include_backward=False)
    assert forward == pytest.approx(2 * parameters, rel=0.15)


def test_matmul_terms_match_a_real_mamba_model():
    """Every nn.Linear and depthwise conv of a real MambaLMHeadModel, counted from its shapes."""
    kernels = pytest.importorskip("kotomamba.kernels")
    kernels.select_kernel_backend("cpu")
    mixer_seq_simple = pytest.importorskip("mamba_ssm.models.mixer_seq_simple")
    from mamba_ssm.models.config_mamba import MambaConfig
    from torch import nn

    for ssm_cfg, scan_terms in (
        ({"layer": "Mamba1"}, 7 * 64 * 16),
        # chunk 8 over seq 32: 2*G*N*Q + d_ssm*Q + 4*d_ssm*N + 2*d_ssm*N/Q
        ({"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8},
         2 * 16 * 8 + 64 * 8 + 4 * 64 * 16 + 2 * 64 * 16 / 8),
    ):
        config = MambaConfig(
            d_model=32, n_layer=2, vocab_size=100, ssm_cfg=ssm_cfg, d_intermediate=48,
            rms_norm=True, fused_add_norm=False, residual_in_fp32=True,
        )
        model = mixer_seq_simple.MambaLMHeadModel(config, device="meta")
        counted = 0
        for module in model.modules():
            if isinstance(module, nn.Linear):
                counted += 2 * module.in_features * module.out_features
            elif isinstance(module, nn.Conv1d):
                counted += 2 * module.kernel_size[0] * module.out_channels
        expected = counted + 2 * scan_terms
        assert flops_per_token(config, 32, include_backward=False) == pytest.approx(expected), ssm_cfg


def test_bad_configs_are_named():
    with pytest.raises(FlopsConfigError, match="Mamba4"):
        flops_per_token(Config(ssm_cfg={"layer": "Mamba4"}), 128)
    with pytest.raises(FlopsConfigError, match="num_heads"):
        flops_per_token(Config(attn_layer_idx=[0]), 128)
    with pytest.raises(FlopsConfigError, match="d_model"):
        flops_per_token(object(), 128)


def test_peak_flops_table_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.5e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H200", "bf16") == 989.5e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("NVIDIA A10", "bf16") == 125e12
    assert peak_flops("Tesla V100-SXM2-32GB", "fp16") == 125e12
    assert peak_flops("Tesla V100-SXM2-32GB", "bf16") is None
    assert peak_flops("NVIDIA L40S", "bf16") == 362.05e12
    assert peak_flops("NVIDIA L4", "fp32") == 30.3e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.5e12
    import torch

    assert peak_flops("NVIDIA A100-SXM4-40GB", torch.float32) == 19.5e12
    assert peak_flops("cpu", "bf16") is None
    assert peak_flops("cpu", "bf16", override_tflops=2.0) == 2e12
    with pytest.raises(FlopsConfigError, match="dtype"):
        peak_flops("NVIDIA H100", "int8")
    # 10k tokens/s at 6e9 FLOPs/token on a 1e15 FLOP/s GPU = 6% MFU
    assert mfu(10_000, 6e9, 1e15) == pytest.approx(0.06)
