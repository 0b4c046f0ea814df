"""kotomamba's channel-first causal convolution with packed documents (Triton, run by the interpreter on
CPU tensors) against causal-conv1d's reference run on each document alone."""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                                reason="runs the Triton kernels in Triton's CPU interpreter")


@pytest.fixture(scope="module")
def conv():
    from kotomamba.kernels import select_kernel_backend

    select_kernel_backend("cpu")
    from kotomamba.ops import causal_conv1d

    return causal_conv1d


def per_document_reference(x, weight, bias, seq_idx, activation):
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref

    rows = []
    for row in range(x.shape[0]):
        starts = [0, *(torch.nonzero(torch.diff(seq_idx[row]))[:, 0] + 1).tolist()]
        ends = [*starts[1:], x.shape[2]]
        rows.append(torch.cat([causal_conv1d_ref(x[row:row + 1, :, s:e], weight, bias, activation=activation)
                               for s, e in zip(starts, ends)], dim=2))
    return torch.cat(rows)


@pytest.mark.parametrize("width, has_bias, silu", [(4, True, True), (3, True, False), (2, False, False)])
def test_each_document_is_convolved_alone(conv, monkeypatch, width, has_bias, silu):
    monkeypatch.setattr(conv, "BLOCK_L", 16)  # documents cross tile edges
    monkeypatch.setattr(conv, "BACKWARD_BLOCK_L", 16)
    generator = torch.Generator().manual_seed(width)
    batch, dim, seqlen = 2, 5, 37
    x = torch.randn(batch, dim, seqlen, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(dim, width, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(dim, generator=generator, dtype=torch.float64, requires_grad=True) if has_bias else None
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int64)
    seq_idx[0, 15:], seq_idx[0, 17:], seq_idx[1, 16:] = 1, 2, 1  # a 2-token document; one at a tile edge
    expected = per_document_reference(x, weight, bias, seq_idx, "silu" if silu else None)
    out = conv.causal_conv1d_documents_fwd(x.detach(), weight.detach(), None if bias is None else bias.detach(),
                                           seq_idx, silu)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # fp32 accumulation
    upstream = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    leaves = [x, weight] + ([bias] if has_bias else [])
    expected_grads = torch.autograd.grad(expected, leaves, upstream)
    buffer = torch.zeros(batch, 2 * dim, seqlen, dtype=torch.float64)  # mamba-ssm hands in a slice of dxz
    dx, dweight, dbias = conv.causal_conv1d_documents_bwd(x.detach(), weight.detach(),
                                                          None if bias is None else bias.detach(), upstream, seq_idx,
                                                          buffer[:, :dim], silu)
    assert dx.data_ptr() == buffer.data_ptr() and torch.equal(buffer[:, dim:], torch.zeros_like(buffer[:, dim:]))
    for name, actual, wanted in zip(("dx", "dweight", "dbias"), (dx, dweight, dbias), expected_grads):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    leaking = conv.causal_conv1d_documents_fwd(x.detach(), weight.detach(), None if bias is None else bias.detach(),
                                               torch.zeros_like(seq_idx), silu)
    assert not torch.allclose(leaking[0, :, 15:18], expected[0, :, 15:18], atol=1e-3)  # the test can tell
