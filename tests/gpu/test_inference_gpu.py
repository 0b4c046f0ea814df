"""Decoding on a GPU with the real kernels and CUDA graphs (`python -m pytest -m gpu tests`)."""
from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VOCAB = 1000
PROMPTS = [[5], [11, 12, 13, 14, 15], [7, 8, 9, 10, 11, 12, 13, 14, 15]]
CONFIGS = {
    "mamba1": ("130m", {"d_model": 256, "n_layer": 4}),
    "mamba2": ("mamba2-130m", {"d_model": 256, "n_layer": 4,
                               "ssm_cfg": {"layer": "Mamba2", "d_state": 64, "headdim": 64, "chunk_size": 64}}),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_cuda_graph_greedy_decoding_equals_argmax_over_full_forward_passes(name):
    from kotomamba.kernels import select_kernel_backend

    assert select_kernel_backend("cuda") == "cuda"
    from kotomamba.generation import Decoder, SamplingSettings
    from kotomamba.model import build_model, load_model_config

    preset, overrides = CONFIGS[name]
    model = build_model(load_model_config(preset, VOCAB, overrides), device="cuda", seed=0).eval()
    completions, _ = Decoder(model, vocab_size=VOCAB, cuda_graph=True).generate(
        PROMPTS, SamplingSettings(max_new_tokens=12, greedy=True), batch_size=3)
    for completion in completions:
        ids = list(PROMPTS[completion.prompt_index])
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids], device="cuda")).logits[0, -1, :VOCAB].argmax()))
        assert completion.tokens == ids[len(PROMPTS[completion.prompt_index]):]
