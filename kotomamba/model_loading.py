"""A training checkpoint's model outside training (inference, export): unsharded, without a process group.

The checkpoint's layout and its readers are kotomamba.checkpoint's; this module turns what they read into
mamba-ssm's MambaLMHeadModel.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

from kotomamba.checkpoint import (
    MODEL_CONFIG, TOKENIZER_DIR, TrainingCheckpointError, find_checkpoint, read_metadata, read_state,
    verify_checkpoint_files,
)
from kotomamba.model import build_empty_model, make_model_config

if TYPE_CHECKING:
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel


def load_model_from_checkpoint(path: str, device: torch.device) -> tuple[MambaLMHeadModel, dict[str, Any]]:
    """The trained model of a checkpoint, unsharded, in fp32 on ``device``, plus what describes it.

    ``path`` is a run's --save directory (the checkpoint ``latest`` names) or one ``iter_*``
    directory, of any checkpoint type. No process group is needed. The dict holds
    ``checkpoint_dir``, ``iteration``, ``tokenizer_type``, ``tokenizer_model`` (the saved copy: a
    file, or a directory for Hugging Face tokenizers; None for NullTokenizer), ``tokenizer_dir``
    (the saved tokenizer files), ``tokenizer_name``, ``original_tokenizer_model`` (the training
    run's path), ``vocab_size`` (NullTokenizer's --vocab-size, else None), ``model_config`` and
    ``config`` (the run's resolved configuration). Problems are TrainingCheckpointErrors.
    """
    directory = find_checkpoint(path)
    if directory is None:
        raise TrainingCheckpointError(f"{path} holds no kotomamba checkpoint")
    metadata = read_metadata(directory)
    problem = verify_checkpoint_files(directory, metadata)
    if problem is not None:
        raise TrainingCheckpointError(f"cannot read the model of checkpoint {directory}: {problem}")
    config_path = directory / MODEL_CONFIG
    try:
        values = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainingCheckpointError(f"cannot read {config_path}: {error}") from None
    model = build_empty_model(make_model_config(values, str(config_path)), device, torch.float32)
    model.tie_weights()
    state = read_state(directory, metadata["checkpoint_type"], {"model": model.state_dict()}, model.config,
                       no_dist=True)
    model.load_state_dict(state["model"])
    model.tie_weights()
    tokenizer = metadata["tokenizer"]
    saved_model = tokenizer.get("saved_model")
    info = {
        "checkpoint_dir": str(directory),
        "iteration": metadata["iteration"],
        "tokenizer_type": tokenizer["type"],
        "tokenizer_model": str(directory / saved_model) if saved_model else None,
        "tokenizer_dir": str(directory / TOKENIZER_DIR),
        "tokenizer_name": tokenizer["name"],
        "original_tokenizer_model": tokenizer.get("original_model"),
        "vocab_size": tokenizer.get("null_vocab_size"),
        "model_config": values,
        "config": metadata.get("config", {}),
    }
    return model.eval(), info
