"""Logits and gradients of a small mamba-ssm model on the GPU, saved for comparison between the CUDA
kernels and the reference functions (run twice, once with KOTOMAMBA_KERNEL_BACKEND=reference).

    python tests/gpu/kernel_outputs.py mamba1|mamba2 OUTPUT.pt
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from kotomamba.kernels import select_kernel_backend  # noqa: E402

CONFIGS = {
    "mamba1": {"d_model": 256, "n_layer": 4},
    "mamba2": {"d_model": 256, "n_layer": 4, "ssm_cfg": {"layer": "Mamba2", "d_state": 64, "headdim": 64,
                                                          "chunk_size": 64}},
}


def main() -> None:
    name, output = sys.argv[1:]
    backend = select_kernel_backend("cuda")
    from kotomamba.model import build_model, load_model_config

    preset = "mamba2-130m" if name == "mamba2" else "130m"
    model = build_model(load_model_config(preset, 1000, CONFIGS[name]), device="cuda", seed=0)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 1000, (2, 256), generator=generator).cuda()
    logits = model(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters()}
    torch.save({"backend": backend, "logits": logits.detach().cpu(), "grads": grads}, output)


if __name__ == "__main__":
    main()
