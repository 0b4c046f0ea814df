"""--reset-state-at-eod on a GPU with the real kernels: kotomamba's scan with seq_idx at a real layer shape,
and Mamba-1 / Mamba-2 models (mamba-ssm's conv1d and Mamba-2 kernels given the document index).

    python -m pytest -m gpu tests/gpu/test_documents_gpu.py -s
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "gpu"))
from test_selective_scan_gpu import GRAD_NAMES, layer_inputs, relative_error  # noqa: E402

PER_DOCUMENT = ("u", "delta", "B", "C", "z")  # the inputs (and gradients) that belong to one document


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-3)], ids=["fp32", "bf16"])
def test_the_scan_with_seq_idx_gives_each_document_what_it_gets_alone(dtype, tolerance):
    from kotomamba.ops.selective_scan import selective_scan_fn

    inputs = layer_inputs(5120, 2048, dtype, batch=2)
    bounds = [[0, 700, 1501, 2048], [0, 1000, 2048]]  # the documents of each row
    seq_idx = torch.zeros(2, 2048, dtype=torch.int32, device="cuda")
    for row, edges in enumerate(bounds):
        for number, start in enumerate(edges[1:-1], start=1):
            seq_idx[row, start:] = number
    upstream = torch.randn(2, 5120, 2048, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    leaves = {name: inputs[name].detach().clone().requires_grad_() for name in GRAD_NAMES}
    out = selective_scan_fn(**leaves, delta_softplus=True, seq_idx=seq_idx)
    grads = dict(zip(GRAD_NAMES, torch.autograd.grad(out, list(leaves.values()), upstream.to(out.dtype))))
    errors = {}
    for row, edges in enumerate(bounds):
        for start, end in zip(edges[:-1], edges[1:]):
            alone = {name: inputs[name][row:row + 1, ..., start:end].detach().clone().requires_grad_()
                     if name in PER_DOCUMENT else inputs[name].detach().clone().requires_grad_() for name in GRAD_NAMES}
            expected = selective_scan_fn(**alone, delta_softplus=True)
            alone_grads = torch.autograd.grad(expected, [alone[name] for name in PER_DOCUMENT],
                                              upstream[row:row + 1, :, start:end].to(expected.dtype))
            key = f"row {row} {start}:{end}"
            errors[key] = {"out": relative_error(out[row:row + 1, :, start:end], expected)}
            for name, grad in zip(PER_DOCUMENT, alone_grads):
                errors[key][name] = relative_error(grads[name][row:row + 1, ..., start:end], grad)
    print(json.dumps({str(dtype): errors}))
    for key, values in errors.items():
        for quantity, error in values.items():
            assert error <= tolerance, (key, quantity, error)


MODEL_CHECK = textwrap.dedent('''
    import json, sys, torch
    from kotomamba.kernels import select_kernel_backend
    select_kernel_backend("cuda", selective_scan="kotomamba", documents=True)
    from kotomamba.documents import document_index, packed_documents
    from kotomamba.model import build_model, load_model_config

    EOD, VOCAB = 0, 512
    result = {}
    for name, overrides in (("mamba1", {"ssm_cfg": {"layer": "Mamba1"}}),
                            ("mamba2", {"ssm_cfg": {"layer": "Mamba2", "headdim": 64, "chunk_size": 256}})):
        model = build_model(load_model_config("130m", VOCAB, {"d_model": 256, "n_layer": 2, **overrides}),
                            device="cuda", seed=1)
        generator = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randint(1, VOCAB, (1, 333), device="cuda", generator=generator)
        b = torch.randint(1, VOCAB, (1, 700), device="cuda", generator=generator)
        packed = torch.cat([a, torch.zeros(1, 1, dtype=a.dtype, device="cuda"), b], dim=1)
        weights = torch.randn(700, VOCAB, device="cuda", generator=generator)

        def run(tokens, reset):
            model.zero_grad()
            with packed_documents(document_index(tokens, EOD) if reset else None):
                logits = model(tokens).logits[0, -700:]
                (logits * weights).sum().backward()
            return logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

        alone = run(b, False)
        for reset in (True, False):
            logits, grads = run(packed, reset)
            result[f"{name} reset={reset}"] = {
                "logits": ((logits - alone[0]).norm() / alone[0].norm()).item(),
                "grads": ((grads - alone[1]).norm() / alone[1].norm()).item()}
    print("RESULT " + json.dumps(result))
''')


def test_mamba1_and_mamba2_models_keep_packed_documents_apart():
    completed = subprocess.run([sys.executable, "-c", MODEL_CHECK], cwd=REPO, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (line,) = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    print(json.dumps(result, indent=1))
    for name in ("mamba1", "mamba2"):
        assert result[f"{name} reset=True"]["logits"] < 1e-5 and result[f"{name} reset=True"]["grads"] < 1e-4, result
        assert result[f"{name} reset=False"]["logits"] > 1e-3, result  # the test can tell a leak
