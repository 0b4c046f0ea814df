"""The model presets: mamba-ssm configs of the public state-spaces checkpoints, by name.

Torch-free, so that the command line (kotomamba.arguments) lists the same names the model code builds.
"""
from __future__ import annotations

_MAMBA1_LM = {
    "d_intermediate": 0,
    "ssm_cfg": {"layer": "Mamba1", "d_state": 16, "d_conv": 4, "expand": 2},
    "attn_layer_idx": [],
    "attn_cfg": {},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}
# The state-spaces/mamba2-* config.json files use pad_vocab_size_multiple 16 (50277 -> 50288 rows).
_MAMBA2_LM = {
    **_MAMBA1_LM,
    "ssm_cfg": {"layer": "Mamba2", "d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64},
    "pad_vocab_size_multiple": 16,
}

# d_model / n_layer from the public checkpoints' config.json files:
#   https://huggingface.co/state-spaces/mamba-{130m,370m,790m,1.4b,2.8b}/blob/main/config.json
#   https://huggingface.co/state-spaces/mamba2-{130m,370m,780m,1.3b,2.7b}/blob/main/config.json
# The other values are those files' (and mamba-ssm's module defaults, spelled out here).
MODEL_PRESETS: dict[str, dict] = {
    "130m": {"d_model": 768, "n_layer": 24, **_MAMBA1_LM},
    "370m": {"d_model": 1024, "n_layer": 48, **_MAMBA1_LM},
    "790m": {"d_model": 1536, "n_layer": 48, **_MAMBA1_LM},
    "1.4b": {"d_model": 2048, "n_layer": 48, **_MAMBA1_LM},
    "2.8b": {"d_model": 2560, "n_layer": 64, **_MAMBA1_LM},
    "mamba2-130m": {"d_model": 768, "n_layer": 24, **_MAMBA2_LM},
    "mamba2-370m": {"d_model": 1024, "n_layer": 48, **_MAMBA2_LM},
    "mamba2-780m": {"d_model": 1536, "n_layer": 48, **_MAMBA2_LM},
    "mamba2-1.3b": {"d_model": 2048, "n_layer": 48, **_MAMBA2_LM},
    "mamba2-2.7b": {"d_model": 2560, "n_layer": 64, **_MAMBA2_LM},
}
