"""Builds mamba-ssm's unmodified ``MambaLMHeadModel``: presets, config files, meta-device init, checkpoints.

mamba-ssm is imported lazily, after ``kotomamba.kernels`` has installed a kernel backend (the
default one for this machine when the caller did not select one), because ``import mamba_ssm``
fails on machines without its CUDA extensions.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import re
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from kotomamba.flops import padded_vocab_size
from kotomamba.kernels import ensure_kernel_backend
from kotomamba.presets import MODEL_PRESETS
from kotomamba.errors import KotomambaError

if TYPE_CHECKING:
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel


class ModelConfigError(KotomambaError, ValueError):
    """A model preset, config file or override is unknown or invalid."""


class CheckpointError(KotomambaError, ValueError):
    """A base-model directory cannot be loaded."""


# Config keys holding keyword dicts; overrides are merged into them instead of replacing them.
_DICT_KEYS = ("ssm_cfg", "attn_cfg")


def _mamba_config_class():
    ensure_kernel_backend()
    from mamba_ssm.models.config_mamba import MambaConfig

    return MambaConfig


def _lm_head_model_class():
    ensure_kernel_backend()
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    return MambaLMHeadModel


# ----------------------------------------------------------------------------------------------
# Configs


def load_model_config(model: str, vocab_size: int, overrides: dict | None = None) -> MambaConfig:
    """The MambaConfig for a preset name, a mamba-ssm config.json, or a directory holding one.

    ``vocab_size`` is the tokenizer's; MambaLMHeadModel pads the embedding to a multiple of
    ``pad_vocab_size_multiple`` itself. ``overrides`` replace top-level keys, except that
    ``ssm_cfg`` / ``attn_cfg`` overrides are merged into the existing dicts.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ModelConfigError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if model in MODEL_PRESETS:
        values, source = copy.deepcopy(MODEL_PRESETS[model]), f"preset {model!r}"
    elif Path(model).exists():
        values, source = _read_config_json(model)
        if "model_type" in values:  # a Hugging Face config.json (--base-model DIR --from-scratch)
            try:
                values = dataclasses.asdict(mamba_ssm_config_from_hf(values, source)[0])
            except CheckpointError as error:
                raise ModelConfigError(str(error)) from None
    else:
        raise ModelConfigError(
            f"--model {model!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor an existing "
            f"config.json or directory containing one"
        )
    values["vocab_size"] = vocab_size
    for key, value in (overrides or {}).items():
        if key in _DICT_KEYS and isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return make_model_config(values, source)


def _config_json_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def _read_config_json(path: str | Path) -> tuple[dict, str]:
    config_path = _config_json_path(path)
    try:
        values = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ModelConfigError(f"no model config at {config_path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelConfigError(f"cannot read model config {config_path}: {error}") from None
    except json.JSONDecodeError as error:
        raise ModelConfigError(
            f"{config_path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})"
        ) from None
    if not isinstance(values, dict):
        raise ModelConfigError(f"{config_path}: expected a JSON object of MambaConfig fields")
    return values, str(config_path)


def make_model_config(values: dict, source: str) -> MambaConfig:
    """A MambaConfig of config.json ``values``, checked; ``source`` names them in errors."""
    config_class = _mamba_config_class()
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ModelConfigError(f"{source}: unknown MambaConfig key(s) {unknown}; known keys: {sorted(known)}")
    for key in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
        value = values.get(key, getattr(config_class, key, None))
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    ssm_cfg = values.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, dict):
        raise ModelConfigError(f"{source}: ssm_cfg must be an object, got {ssm_cfg!r}")
    layer = ssm_cfg.get("layer", "Mamba1")
    # mamba-ssm's create_block only builds these two mixers (Mamba3 is not wired into MambaLMHeadModel).
    if layer not in ("Mamba1", "Mamba2"):
        raise ModelConfigError(f"{source}: ssm_cfg.layer must be 'Mamba1' or 'Mamba2', got {layer!r}")
    return config_class(**values)


# ----------------------------------------------------------------------------------------------
# Building and initialization


def build_model(config: MambaConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                on_meta: bool = False, seed: int | None = None) -> MambaLMHeadModel:
    """mamba-ssm's MambaLMHeadModel, initialized by its own constructor.

    With ``on_meta`` the parameters live on the meta device (no memory, no initialization; ``device``
    and ``seed`` are then unused); turn them into real tensors, initialized exactly as with
    ``seed``, with ``materialize_and_init(model, device, seed)``.
    """
    model_class = _lm_head_model_class()
    if on_meta:
        return model_class(config, device="meta", dtype=dtype)
    if seed is not None:
        torch.manual_seed(seed)
    return model_class(config, device=device, dtype=dtype)


def materialize_and_init(model: MambaLMHeadModel, device: torch.device | str, seed: int) -> MambaLMHeadModel:
    """Allocate a meta-device model on ``device`` and initialize it exactly as mamba-ssm's constructor.

    Equal, bit for bit, to ``build_model(config, device, dtype, seed=seed)``: the RNG is consumed
    in the constructor's order with the same operations. The embedding, final norm and lm_head
    are re-initialized in place by their own ``reset_parameters``; each layer is rebuilt one at a
    time with mamba-ssm's ``create_block`` (so Mamba/Mamba2/MHA/MLP run their own init code) and
    copied over; then mamba-ssm's ``_init_weights`` passes and ``tie_weights`` run as in
    MixerModel.__init__ and MambaLMHeadModel.__init__.
    """
    from mamba_ssm.models.mixer_seq_simple import _init_weights, create_block

    if any(not parameter.is_meta for parameter in model.parameters()):
        raise ValueError("materialize_and_init expects a model built with build_model(..., on_meta=True)")
    _materialize(model, device)
    config = model.config
    backbone = model.backbone
    factory_kwargs = {"device": device, "dtype": backbone.embedding.weight.dtype}
    torch.manual_seed(seed)
    with torch.no_grad():
        backbone.embedding.reset_parameters()
        for layer_idx, layer in enumerate(backbone.layers):
            # Same arguments as MixerModel.__init__ passes (it leaves norm_epsilon at its 1e-5 default).
            fresh = create_block(
                config.d_model,
                d_intermediate=config.d_intermediate,
                ssm_cfg=config.ssm_cfg,
                attn_layer_idx=config.attn_layer_idx,
                attn_cfg=config.attn_cfg,
                norm_epsilon=1e-5,
                rms_norm=config.rms_norm,
                residual_in_fp32=config.residual_in_fp32,
                fused_add_norm=config.fused_add_norm,
                layer_idx=layer_idx,
                **factory_kwargs,
            )
            _copy_tensors(fresh, layer)
            del fresh
        backbone.norm_f.reset_parameters()
        n_residuals_per_layer = 1 if config.d_intermediate == 0 else 2
        backbone.apply(partial(_init_weights, n_layer=config.n_layer, n_residuals_per_layer=n_residuals_per_layer))
        model.lm_head.reset_parameters()
        model.apply(partial(_init_weights, n_layer=config.n_layer))
    model.tie_weights()
    return model


def build_empty_model(config: MambaConfig, device: torch.device | str, dtype: torch.dtype) -> MambaLMHeadModel:
    """A MambaLMHeadModel as mamba-ssm builds it in ``dtype`` on ``device``, its tensors allocated but
    not initialized (the random initialization is slow and pointless): for loading every tensor. A tied
    lm_head is untied until ``model.tie_weights()``, which the caller runs once the tensors are loaded."""
    model = build_model(config, on_meta=True, dtype=dtype)
    _materialize(model, device)
    return model


def _materialize(model: nn.Module, device: torch.device | str) -> None:
    """to_empty(), keeping the Python attributes mamba-ssm puts on parameters (_no_reinit, _no_weight_decay).

    to_empty() replaces every meta Parameter by a new object, which drops those attributes and
    unties lm_head from the embedding (callers re-tie).
    """
    attributes = {name: dict(vars(p)) for name, p in model.named_parameters(remove_duplicate=False)}
    model.to_empty(device=device)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        vars(parameter).update(attributes[name])


def _copy_tensors(source: nn.Module, target: nn.Module) -> None:
    for name, tensor in source.named_parameters():
        target.get_parameter(name).copy_(tensor)
    for name, tensor in source.named_buffers():
        target.get_buffer(name).copy_(tensor)


# ----------------------------------------------------------------------------------------------
# Continual pretraining


def load_base_model(dir: str, vocab_size: int | None = None, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> MambaLMHeadModel:
    """A MambaLMHeadModel on ``device`` from a mamba-ssm model directory (config.json with d_model) or a
    Hugging Face Mamba / Mamba-2 directory (config.json with model_type "mamba" / "mamba2", converted),
    with model.safetensors or pytorch_model.bin (or their sharded forms).

    The model keeps the checkpoint's vocabulary; a tokenizer (``vocab_size``) with more tokens than
    the embedding has rows is an error.
    """
    directory = Path(dir)
    if not directory.is_dir():
        raise CheckpointError(f"base model directory {directory} does not exist")
    values, source = _read_config_json(directory)
    hf_model_type = values.get("model_type")
    if hf_model_type is not None:
        config, norm_eps = mamba_ssm_config_from_hf(values, source)
        if norm_eps != MAMBA_SSM_NORM_EPS:
            # MambaConfig has no norm epsilon: the converted model, its checkpoints and exports would lose it.
            raise CheckpointError(
                f"{source}: layer_norm_epsilon {norm_eps:g} cannot be expressed in mamba-ssm's config (its norms "
                f"always use {MAMBA_SSM_NORM_EPS:g}); this model can only be used for inference (inference.py)")
    else:
        if "vocab_size" not in values:
            raise CheckpointError(f"{source} has no vocab_size")
        config = make_model_config(values, source)
    multiple = config.pad_vocab_size_multiple
    embedding_rows = padded_vocab_size(config.vocab_size, multiple)
    if vocab_size is not None and vocab_size > embedding_rows:
        raise CheckpointError(
            f"tokenizer has {vocab_size} tokens but the base model in {directory} has only {embedding_rows} "
            f"embedding rows (vocab_size {config.vocab_size} padded to a multiple of {multiple})"
        )
    weights_path, state_dict = read_weights(directory)
    if hf_model_type is not None:
        state_dict = mamba_ssm_state_dict_from_hf(state_dict, config)
    return model_from_state_dict(config, state_dict, device, dtype, f"{weights_path} (config {source})")


def model_from_state_dict(config: MambaConfig, state_dict: dict[str, torch.Tensor], device: torch.device | str,
                          dtype: torch.dtype, source: str) -> MambaLMHeadModel:
    """A MambaLMHeadModel built as mamba-ssm builds it in ``dtype``, on ``device``, holding ``state_dict``
    (which must match it, except a tied lm_head.weight that may be absent). ``source`` names the weights."""
    model = build_empty_model(config, device, dtype)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise CheckpointError(f"{source}: the weights do not match the config: {error}") from None
    if config.tie_embeddings:
        missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{source}: the weights do not match the config: missing {sorted(missing)}, "
                              f"unexpected {sorted(unexpected)}")
    model.tie_weights()
    return model


def read_weights(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(file read, state dict) of model.safetensors or pytorch_model.bin in ``directory``, or of their
    sharded forms (``*.index.json``). safetensors is preferred: reading it runs no unpickler."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = directory / name
        if path.is_file():
            return path, _read_weights_file(path)
        index = directory / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise CheckpointError(f"cannot read the shard index {index}: {type(error).__name__}: "
                                      f"{_first_line(error)}") from None
            if not shards:
                raise CheckpointError(f"{index} names no weight files")
            state_dict: dict[str, torch.Tensor] = {}
            for shard in shards:
                state_dict.update(_read_weights_file(directory / shard))
            return index, state_dict
    raise CheckpointError(f"{directory} has neither model.safetensors nor pytorch_model.bin (nor a sharded index)")


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # every reader failure becomes one readable line
        raise CheckpointError(f"cannot read weights {path}: {describe_load_failure(error)}") from None


def describe_load_failure(error: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)`` / safetensors read. A file holding pickled
    objects other than tensors is refused rather than unpickled: unpickling runs arbitrary code."""
    text = str(error)
    custom = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if custom:
        return (f"refused: it holds a pickled {custom.group(1)} object, and loading it would need arbitrary "
                f"unpickling (which can run any code); only files of plain tensors are read")
    if isinstance(error, pickle.UnpicklingError):
        detail = re.search(r"WeightsUnpickler error: *\n?\s*(.+)", text)
        return (f"damaged, or not the kind of file expected: "
                f"{detail.group(1).strip() if detail else _first_line(error)}")
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers' MambaForCausalLM / Mamba2ForCausalLM -> mamba-ssm

HF_MODEL_TYPES = ("mamba", "mamba2")
# mamba-ssm builds every norm with eps 1e-5 (MambaLMHeadModel passes no norm_epsilon).
MAMBA_SSM_NORM_EPS = 1e-5


def mamba_ssm_config_from_hf(hf_config: dict, source: str) -> tuple[MambaConfig, float]:
    """The mamba-ssm MambaConfig computing what a transformers Mamba / Mamba-2 config.json dict
    computes, and the norms' epsilon (which MambaConfig cannot hold). The vocabulary is not padded
    (pad_vocab_size_multiple 1), so logits have exactly the Hugging Face model's columns."""
    model_type = hf_config.get("model_type")

    def get(key: str, default: object = dataclasses.MISSING):
        if hf_config.get(key) is not None:
            return hf_config[key]
        if default is dataclasses.MISSING:
            raise CheckpointError(f"{source}: Hugging Face {model_type} config has no {key!r}")
        return default

    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not a Mamba model (expected 'mamba' or "
                              f"'mamba2'), and it has no d_model of a mamba-ssm config")
    if get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"{source}: hidden_act {hf_config['hidden_act']!r} is not supported "
                              f"(mamba-ssm's mixers use silu)")
    d_model, expand = get("hidden_size"), get("expand", 2)
    common = {"d_state": get("state_size"), "d_conv": get("conv_kernel", 4), "expand": expand,
              "conv_bias": get("use_conv_bias", True), "bias": get("use_bias", False)}
    if model_type == "mamba":
        ssm_cfg = {"layer": "Mamba1", **common, "dt_rank": get("time_step_rank", "auto")}
        tied_default = True
    else:
        heads, head_dim = get("num_heads"), get("head_dim")
        if heads * head_dim != int(expand * d_model):
            raise CheckpointError(f"{source}: num_heads x head_dim = {heads * head_dim} must equal expand x "
                                  f"hidden_size = {int(expand * d_model)} to map onto mamba-ssm's Mamba2")
        ssm_cfg = {"layer": "Mamba2", **common, "headdim": head_dim, "ngroups": get("n_groups", 1),
                   "chunk_size": get("chunk_size", 256),
                   "dt_limit": tuple(_json_float(v) for v in get("time_step_limit", (0.0, float("inf")))),
                   "rmsnorm": True, "norm_before_gate": False}
        tied_default = False  # transformers' Mamba2Config default
    config = _mamba_config_class()(
        d_model=d_model, d_intermediate=0, n_layer=get("num_hidden_layers"), vocab_size=get("vocab_size"),
        ssm_cfg=ssm_cfg, attn_layer_idx=[], attn_cfg={}, rms_norm=True,
        residual_in_fp32=get("residual_in_fp32", True), fused_add_norm=True, pad_vocab_size_multiple=1,
        tie_embeddings=get("tie_word_embeddings", tied_default))
    return config, float(get("layer_norm_epsilon", MAMBA_SSM_NORM_EPS))


def _json_float(value: object) -> float:
    # transformers 5 writes non-finite floats as {"__float__": "Infinity"}; older versions as Infinity.
    return float(value["__float__"]) if isinstance(value, dict) and "__float__" in value else float(value)


def mamba_ssm_state_dict_from_hf(state_dict: dict[str, torch.Tensor], config: MambaConfig) -> dict[str, torch.Tensor]:
    """transformers parameter names -> mamba-ssm's (only the embedding is named differently)."""
    renamed = {("backbone.embedding." + key[len("backbone.embeddings."):]
                if key.startswith("backbone.embeddings.") else key): tensor for key, tensor in state_dict.items()}
    if config.tie_embeddings:
        renamed.pop("lm_head.weight", None)  # the embedding itself
    return renamed


def mamba_ssm_model_from_hf(hf_config: dict, state_dict: dict[str, torch.Tensor], device: torch.device | str,
                            dtype: torch.dtype, source: str = "Hugging Face model") -> MambaLMHeadModel:
    """mamba-ssm's MambaLMHeadModel with the weights of a transformers MambaForCausalLM / Mamba2ForCausalLM
    (``hf_config`` is its config.json dict), in eval mode, computing the same function, including a norm
    epsilon other than mamba-ssm's (set on the modules; such a model is for inference only)."""
    config, norm_eps = mamba_ssm_config_from_hf(hf_config, source)
    model = model_from_state_dict(config, mamba_ssm_state_dict_from_hf(state_dict, config), device, dtype, source)
    if norm_eps != MAMBA_SSM_NORM_EPS:
        # mamba-ssm's norms read their eps attribute on every call; the config has no field for it.
        for module in model.modules():
            if hasattr(module, "eps") and hasattr(module, "weight"):
                module.eps = norm_eps
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Parameter bookkeeping


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (tied embeddings counted once); works on meta models."""
    return sum(parameter.numel() for parameter in model.parameters())
