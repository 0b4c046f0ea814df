"""kotomamba's Triton selective scan, run by Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1 on machines without a GPU), against mamba-ssm's selective_scan_ref and a float64
recurrence: outputs, final state and every gradient."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                                reason="runs the Triton kernels in Triton's CPU interpreter")

REPO = Path(__file__).resolve().parents[1]
# Small tiles, so that short sequences cross several segments and channels span several programs.
SMALL = dict(forward_block_d=4, forward_warps=1, backward_block_d=4, backward_warps=1, segment=8)


@pytest.fixture(scope="module")
def scan():
    from kotomamba.kernels import select_kernel_backend

    select_kernel_backend("cpu")
    from kotomamba.ops import selective_scan

    return selective_scan


@pytest.fixture
def small_tiles(scan, monkeypatch):
    monkeypatch.setattr(scan, "DEFAULT_CONFIG", scan.ScanConfig(**SMALL))


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int = 2
    dim: int = 6
    seqlen: int = 37  # two full chunks of 16 and a partial one
    dstate: int = 5  # not a power of two
    groups: int = 1
    has_D: bool = True
    has_z: bool = True
    has_bias: bool = True
    softplus: bool = True
    squeeze_bc: bool = False  # B and C as (batch, d_state, seqlen)


def make_inputs(case: Case, dtype=torch.float32, seed=0) -> dict[str, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, dtype=dtype):
        return (scale * torch.randn(*shape, generator=generator)).to(dtype).requires_grad_()

    bc_shape = (case.batch, case.dstate, case.seqlen) if case.squeeze_bc else \
        (case.batch, case.groups, case.dstate, case.seqlen)
    return {
        "u": randn(case.batch, case.dim, case.seqlen),
        "delta": randn(case.batch, case.dim, case.seqlen, scale=0.5),
        "A": (-(torch.rand(case.dim, case.dstate, generator=generator) * 2 + 0.2)).requires_grad_(),
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
        "D": randn(case.dim, dtype=torch.float32) if case.has_D else None,
        "z": randn(case.batch, case.dim, case.seqlen) if case.has_z else None,
        "delta_bias": randn(case.dim, scale=0.3, dtype=torch.float32) if case.has_bias else None,
    }


def float64_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=True):
    """The recurrence of selective_scan_ref, step by step in float64 (mamba-ssm's reference runs in fp32)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    per_group = u.shape[1] // B.shape[1]
    B, C = B.repeat_interleave(per_group, dim=1), C.repeat_interleave(per_group, dim=1)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    outputs = []
    for t in range(u.shape[2]):
        state = torch.exp(delta[:, :, t, None] * A) * state + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, :, :, t]
        outputs.append((state * C[:, :, :, t]).sum(-1))
    out = torch.stack(outputs, dim=2)
    if D is not None:
        out = out + u * D.double()[:, None]
    if z is not None:
        out = out * F.silu(z.double())
    return out, state


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def outputs_and_grads(function, inputs, case, upstream):
    out, last_state = function(**inputs, delta_softplus=case.softplus, return_last_state=True)
    leaves = {name: tensor for name, tensor in inputs.items() if tensor is not None}
    grads = torch.autograd.grad(out, list(leaves.values()), upstream.to(out.dtype))
    return out, last_state, dict(zip(leaves, grads))


def detached_copy(inputs):
    return {name: None if t is None else t.detach().clone().requires_grad_() for name, t in inputs.items()}


CASES = {
    "all options": Case(),
    "groups": Case(dim=8, groups=2),
    "no D, z, bias or softplus": Case(has_D=False, has_z=False, has_bias=False, softplus=False),
    "z without D": Case(has_D=False),
    "length a multiple of the chunk": Case(seqlen=32),
    "shorter than a chunk": Case(seqlen=11),
    "one step": Case(seqlen=1, batch=1),
    "channels not a multiple of the blocks": Case(dim=7, dstate=4),
    "B and C without a group dimension": Case(squeeze_bc=True),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_mamba_ssm_reference_and_float64(name, scan, small_tiles):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    case = CASES[name]
    inputs = make_inputs(case)
    upstream = torch.randn(case.batch, case.dim, case.seqlen, generator=torch.Generator().manual_seed(1))
    ours = outputs_and_grads(scan.selective_scan_fn, inputs, case, upstream)
    reference = outputs_and_grads(selective_scan_ref, detached_copy(inputs), case, upstream)
    exact = outputs_and_grads(float64_scan, detached_copy(inputs), case, upstream)
    for label, expected in (("selective_scan_ref", reference), ("float64", exact)):
        assert relative_error(ours[0], expected[0]) < 1e-5, label
        assert relative_error(ours[1], expected[1]) < 1e-5, label
        assert ours[1].shape == (case.batch, case.dim, case.dstate) and ours[1].dtype == torch.float32
        for grad_name, grad in expected[2].items():
            if grad.abs().max() == 0:  # dA of a one-step sequence: h_{t-1} is zero
                assert ours[2][grad_name].abs().max() == 0, grad_name
                continue
            assert ours[2][grad_name].shape == grad.shape, grad_name
            assert relative_error(ours[2][grad_name], grad) < 1e-5, (label, grad_name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, scan, small_tiles):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    case = Case()
    inputs = make_inputs(case, dtype=dtype)
    upstream = torch.randn(case.batch, case.dim, case.seqlen, generator=torch.Generator().manual_seed(2))
    ours = outputs_and_grads(scan.selective_scan_fn, inputs, case, upstream)
    reference = outputs_and_grads(selective_scan_ref, detached_copy(inputs), case, upstream)
    assert ours[0].dtype == dtype
    # The reference computes in fp32 from the same half-precision inputs; both round the outputs once.
    assert relative_error(ours[0], reference[0]) < 1e-2
    for grad_name, grad in reference[2].items():
        assert ours[2][grad_name].dtype == grad.dtype, grad_name
        assert relative_error(ours[2][grad_name], grad) < 1e-2, grad_name


BACKWARD_VARIANTS = {
    # dB/dC through per-program partial sums instead of atomic adds
    "deterministic partial sums": (dict(deterministic=True), Case(dim=8, groups=2), 4),
    # the backward skips its per-segment pass and restarts every tile from the first pass's state
    "one-tile segments": (dict(segment=4), Case(seqlen=23), 5),
}


@pytest.mark.parametrize("name", BACKWARD_VARIANTS)
def test_backward_variants_match_the_reference(name, scan, monkeypatch):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    config, case, seed = BACKWARD_VARIANTS[name]
    monkeypatch.setattr(scan, "DEFAULT_CONFIG", scan.ScanConfig(**dict(SMALL, **config)))
    inputs = make_inputs(case)
    upstream = torch.randn(case.batch, case.dim, case.seqlen, generator=torch.Generator().manual_seed(seed))
    ours = outputs_and_grads(scan.selective_scan_fn, inputs, case, upstream)
    reference = outputs_and_grads(selective_scan_ref, detached_copy(inputs), case, upstream)
    for grad_name, grad in reference[2].items():
        assert relative_error(ours[2][grad_name], grad) < 1e-5, grad_name


PARTS = {
    # segment 8: backward parts of 16 steps (16, 16, 5); the forward unsplit
    "backward in three parts": (dict(backward_parts=3), Case(seqlen=37)),
    "forward and backward in three parts, groups": (dict(forward_parts=3, backward_parts=3), Case(seqlen=37, dim=8, groups=2)),
    # backward parts of 16 steps, forward parts of two of them (32, 29)
    "forward parts of two backward parts": (dict(forward_parts=2, backward_parts=4), Case(seqlen=61)),
    "no D, z, bias or softplus, in parts": (dict(forward_parts=3, backward_parts=3),
                                           Case(seqlen=37, has_D=False, has_z=False, has_bias=False, softplus=False)),
    "deterministic, in parts": (dict(forward_parts=2, backward_parts=3, deterministic=True), Case(dim=8, groups=2)),
}


@pytest.mark.parametrize("name", PARTS)
def test_sequence_split_into_parts_matches_the_reference(name, scan, monkeypatch):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    config, case = PARTS[name]
    monkeypatch.setattr(scan, "DEFAULT_CONFIG", scan.ScanConfig(**dict(SMALL, **config)))
    inputs = make_inputs(case)
    upstream = torch.randn(case.batch, case.dim, case.seqlen, generator=torch.Generator().manual_seed(3))
    ours = outputs_and_grads(scan.selective_scan_fn, inputs, case, upstream)
    saved = scan.scan_forward(*(None if t is None else t.detach() for t in inputs.values()), case.softplus)[1]
    assert saved.shape[2] == config["backward_parts"]  # a saved state per backward part
    for label, function in (("selective_scan_ref", selective_scan_ref), ("float64", float64_scan)):
        expected = outputs_and_grads(function, detached_copy(inputs), case, upstream)
        assert relative_error(ours[0], expected[0]) < 1e-5, label
        assert relative_error(ours[1], expected[1]) < 1e-5, label
        for grad_name, grad in expected[2].items():
            assert relative_error(ours[2][grad_name], grad) < 1e-5, (label, grad_name)


def test_parts_are_picked_to_fill_the_gpus_warp_slots(scan, monkeypatch):
    """The model behind parts=None, on a 132-multiprocessor GPU: 2.8b layers (5,120 channels, 8 per program)."""
    monkeypatch.setattr(scan, "_multiprocessors", lambda device: 132)
    config, gpu = scan.ScanConfig(), torch.device("cuda")
    backward = {batch: scan._auto_parts("backward", 640 * batch, 2048, 1, gpu, config) for batch in (1, 8, 16)}
    # batch 1: 640 programs leave 70% of the 2,112 slots empty; split into 13 parts they run in 4 full waves.
    # batch 8: 2.4 waves; 2 parts fill 5 of the 6 half waves the rounding-up makes. batch 16: 4.85, no gain.
    assert backward == {1: 13, 8: 2, 16: 1}
    assert scan._auto_parts("forward", 640 * 8, 2048, 1, gpu, config) == 1  # running parts twice does not pay
    assert scan._auto_parts("forward", 640, 2048, 1, gpu, config) == 1  # parts of at least 2048 steps
    assert scan._auto_parts("forward", 640, 16384, 1, gpu, config) == 4  # 2,560 of 3,168 slots
    assert scan._auto_parts("backward", 640, 256, 1, gpu, config) == 2  # parts of at least 128 steps
    assert scan._auto_parts("backward", 640, 2048, 1, torch.device("cpu"), config) == 1


def test_backward_is_bitwise_deterministic(scan, monkeypatch):
    monkeypatch.setattr(scan, "DEFAULT_CONFIG", scan.ScanConfig(**dict(SMALL, deterministic=True)))
    case = Case(dim=8, groups=2)
    inputs = make_inputs(case)
    upstream = torch.randn(case.batch, case.dim, case.seqlen)
    first = outputs_and_grads(scan.selective_scan_fn, inputs, case, upstream)[2]
    second = outputs_and_grads(scan.selective_scan_fn, inputs, case, upstream)[2]
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_extension_contract_under_mamba_ssms_own_autograd_function(scan, small_tiles):
    """mamba-ssm's SelectiveScanFn (the fwd/bwd calls its MambaInnerFn makes too) on the stand-in extension."""
    import mamba_ssm.ops.selective_scan_interface as interface

    for case in (Case(), Case(has_z=False, has_D=False)):
        inputs = make_inputs(case)
        upstream = torch.randn(case.batch, case.dim, case.seqlen)
        previous = interface.selective_scan_cuda
        interface.selective_scan_cuda = scan.SelectiveScanExtension(None)
        try:
            out = interface.SelectiveScanFn.apply(*inputs.values(), case.softplus, False)
            grads = torch.autograd.grad(out, [t for t in inputs.values() if t is not None], upstream)
        finally:
            interface.selective_scan_cuda = previous
        reference_inputs = detached_copy(inputs)
        expected = interface.selective_scan_ref(**reference_inputs, delta_softplus=case.softplus)
        expected_grads = torch.autograd.grad(expected, [t for t in reference_inputs.values() if t is not None],
                                             upstream)
        assert relative_error(out, expected) < 1e-5
        for grad, expected_grad in zip(grads, expected_grads):
            assert relative_error(grad, expected_grad) < 1e-5


def test_extension_backward_writes_into_a_preallocated_dz_view(scan, small_tiles):
    """MambaInnerFn hands bwd a dz that is a view into its dxz buffer and returns that buffer."""
    case = Case()
    inputs = make_inputs(case)
    values = [t.detach() if t is not None else None for t in inputs.values()]
    extension = scan.SelectiveScanExtension(None)
    out, states, out_z = extension.fwd(*values, True)
    assert out.numel() == 0  # with z the pre-gate output is recomputed in backward, not kept
    dout = torch.randn(case.batch, case.dim, case.seqlen)
    dxz = torch.full((case.batch, 2 * case.dim, case.seqlen), float("nan"))
    dz_view = dxz.chunk(2, dim=1)[1]
    result = extension.bwd(*values, dout, states, out, dz_view, True, True)
    plain = extension.bwd(*values, dout, states, out, None, True, True)
    assert len(result) == 9
    assert torch.equal(dxz[:, case.dim:], plain[7]) and result[7].data_ptr() == dz_view.data_ptr()
    assert torch.equal(result[8], out_z)  # the recomputed gated output equals the forward's


@pytest.mark.parametrize("change, message", [
    (lambda i: i.update(A=torch.complex(i["A"], i["A"])), "A must be real float32"),
    (lambda i: i.update(B=i["B"][:, :, :, :-1]), "B has shape"),
    (lambda i: i.update(delta=i["delta"].double()), "u and delta must both be"),
    (lambda i: i.update(D=i["D"][:-1]), "D must be float32 of shape"),
    (lambda i: i.update(C=torch.randn(6, 5)), "C must be input-dependent"),
])
def test_unsupported_inputs_are_refused_by_name(change, message, scan):
    inputs = {name: None if t is None else t.detach() for name, t in make_inputs(Case()).items()}
    change(inputs)
    with pytest.raises(scan.SelectiveScanInputError, match=message):
        scan.selective_scan_fn(**inputs)


def test_real_mamba1_model_on_the_triton_scan_matches_the_reference_routing(tmp_path):
    """The real MambaLMHeadModel (Mamba-1) with --selective-scan kotomamba routing: same logits and gradients."""
    script = tmp_path / "model_run.py"
    script.write_text(f"""
import sys, torch
from kotomamba.kernels import select_kernel_backend, kernel_summary
select_kernel_backend("cpu", selective_scan=sys.argv[1])
import mamba_ssm.modules.mamba_simple as mamba_simple
from kotomamba.ops import selective_scan
selective_scan.DEFAULT_CONFIG = selective_scan.ScanConfig(**{SMALL!r})
from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
torch.manual_seed(0)
model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=64, ssm_cfg={{"layer": "Mamba1"}},
                                     rms_norm=True, fused_add_norm=True, residual_in_fp32=True))
tokens = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
logits = model(tokens).logits
logits.float().square().mean().backward()
torch.save({{"logits": logits.detach(), "scan": mamba_simple.selective_scan_fn.__module__,
            "summary": kernel_summary(),
            "grads": {{n: p.grad for n, p in model.named_parameters()}}}}, sys.argv[2])
""")
    results = {}
    for choice in ("kotomamba", "mamba-ssm"):
        path = tmp_path / f"{choice}.pt"
        completed = subprocess.run([sys.executable, str(script), choice, str(path)], capture_output=True, text=True,
                                   timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert completed.returncode == 0, completed.stderr[-3000:]
        results[choice] = torch.load(path)
    ours, reference = results["kotomamba"], results["mamba-ssm"]
    assert ours["scan"] == "kotomamba.ops.selective_scan"
    assert reference["scan"] == "mamba_ssm.ops.selective_scan_interface"
    assert "selective scan: kotomamba's Triton kernel" in ours["summary"]
    assert "selective scan: mamba-ssm's reference function" in reference["summary"]
    assert relative_error(ours["logits"], reference["logits"]) < 1e-5
    for name, grad in reference["grads"].items():
        assert relative_error(ours["grads"][name], grad) < 1e-4, name


def test_kotomamba_scan_on_cpu_without_the_interpreter_is_refused():
    code = ("from kotomamba.kernels import select_kernel_backend\n"
            "select_kernel_backend('cpu', selective_scan='kotomamba')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                               env=dict(env, PYTHONPATH=str(REPO)))
    assert completed.returncode != 0
    assert "--selective-scan kotomamba runs Triton kernels, which need a GPU" in completed.stderr


def test_deterministic_choice_routes_to_the_partial_sum_backward():
    code = ("from kotomamba.kernels import select_kernel_backend, kernel_summary\n"
            "select_kernel_backend('cpu', selective_scan='kotomamba-deterministic')\n"
            "import mamba_ssm.modules.mamba_simple as mamba_simple\n"
            "from kotomamba.ops import selective_scan\n"
            "print(mamba_simple.selective_scan_fn.__module__, selective_scan.DEFAULT_CONFIG.deterministic)\n"
            "print(kernel_summary())\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "kotomamba.ops.selective_scan True" in completed.stdout
    assert "selective scan: kotomamba's Triton kernel, deterministic backward" in completed.stdout


@pytest.mark.parametrize("parts", [1, 4], ids=["one part", "four parts"])  # parts of 8 steps: 8, 16, 24
@pytest.mark.parametrize("split", [8, 13])  # the document boundary: at a segment's (and part's) edge, inside a tile
def test_packed_documents_do_not_see_each_other(split, parts, scan, monkeypatch):
    """With seq_idx, the second of two documents packed into one sequence gets exactly the outputs and
    gradients it gets alone (in float64 to the last bits the kernel's fp32 allows), and the first document's
    are those of the first document alone; without seq_idx they differ."""
    monkeypatch.setattr(scan, "DEFAULT_CONFIG", scan.ScanConfig(**dict(SMALL, forward_parts=parts, backward_parts=parts)))
    case = Case(batch=2, dim=4, seqlen=29)
    inputs = make_inputs(case)
    seq_idx = torch.zeros(case.batch, case.seqlen, dtype=torch.int64)
    seq_idx[:, split:] = 1
    seq_idx[1, :] = torch.arange(case.seqlen) // 11  # the second row: three documents (0-10, 11-21, 22-28)
    out = scan.selective_scan_fn(**inputs, delta_softplus=True, seq_idx=seq_idx)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    packed_grads = torch.autograd.grad(out, [inputs[name] for name in ("u", "delta", "B", "C", "z")], grad_out)
    for row in range(case.batch):
        bounds = torch.nonzero(torch.diff(seq_idx[row]), as_tuple=True)[0].add(1).tolist()
        for start, end in zip([0, *bounds], [*bounds, case.seqlen]):
            alone = {name: None if value is None else
                     value[row:row + 1, ..., start:end] if value.dim() >= 3 else value
                     for name, value in inputs.items()}
            expected = scan.selective_scan_fn(**alone, delta_softplus=True)
            torch.testing.assert_close(out[row:row + 1, :, start:end], expected, rtol=1e-5, atol=1e-5)
            grads = torch.autograd.grad(expected, [alone[name] for name in ("u", "delta", "B", "C", "z")],
                                        grad_out[row:row + 1, :, start:end])
            for name, packed, single in zip(("u", "delta", "B", "C", "z"), packed_grads, grads):
                torch.testing.assert_close(packed[row:row + 1, ..., start:end], single[..., start:end]
                                           if single.shape[-1] != end - start else single, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{name}, row {row}, document {start}:{end}: {m}")
    unreset = scan.selective_scan_fn(**inputs, delta_softplus=True)
    assert not torch.allclose(unreset[0, :, split:], out[0, :, split:], atol=1e-3)


def test_auto_runs_ours_only_for_calls_of_the_measured_size(scan, small_tiles):
    """--selective-scan auto on a measured GPU: calls below min_channels (batch x dim) go to mamba-ssm's
    extension, forward and backward alike; larger ones to the Triton kernels."""
    calls = []

    class Recording:
        def fwd(self, *args):
            calls.append(("fwd", tuple(args[0].shape)))
            return ["mamba-ssm fwd"]

        def bwd(self, *args):
            calls.append(("bwd", tuple(args[0].shape)))
            return ["mamba-ssm bwd"]

    extension = scan.SelectiveScanExtension(Recording(), min_channels=12)
    for case, ours in ((Case(batch=2, dim=6), True), (Case(batch=2, dim=4), False)):
        values = [t.detach() if t is not None else None for t in make_inputs(case).values()]
        forward = extension.fwd(*values, True)
        x, out = (forward[1], forward[0]) if ours else (None, None)
        backward = extension.bwd(*values, torch.randn(case.batch, case.dim, case.seqlen), x, out, None, True, False)
        assert (forward == ["mamba-ssm fwd"]) == (not ours) and (backward == ["mamba-ssm bwd"]) == (not ours)
    assert calls == [("fwd", (2, 4, 37)), ("bwd", (2, 4, 37))]


def test_auto_resolves_per_call_on_measured_gpus_only(monkeypatch):
    from kotomamba import kernels

    monkeypatch.setattr(kernels.torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert kernels._resolve_selective_scan("auto", torch.device("cuda"), "cuda") == "auto"
    assert kernels._scan_min_channels(torch.device("cuda")) == kernels.SCAN_MEASURED_FASTER[(9, 0)]
    monkeypatch.setattr(kernels.torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert kernels._resolve_selective_scan("auto", torch.device("cuda"), "cuda") == "mamba-ssm"
    assert kernels._resolve_selective_scan("auto", torch.device("cpu"), "reference") == "reference"


def test_a_call_that_would_leave_kotomambas_scan_with_packed_documents_is_refused(scan, small_tiles):
    from kotomamba.documents import packed_documents

    extension = scan.SelectiveScanExtension(None, min_channels=10 ** 9)  # every call would go to mamba-ssm's
    case = Case()
    values = [t.detach() if t is not None else None for t in make_inputs(case).values()]
    with packed_documents(torch.zeros(case.batch, case.seqlen, dtype=torch.int32)):
        with pytest.raises(scan.SelectiveScanInputError, match="packed documents need kotomamba's scan"):
            extension.fwd(*values, True)
