"""Export a training checkpoint (or convert a model directory) to mamba-ssm's or Hugging Face transformers'
model format.

    python -m kotomamba.convert CHECKPOINT OUTPUT_DIR --format mamba-ssm   # config.json + pytorch_model.bin
    python -m kotomamba.convert CHECKPOINT OUTPUT_DIR --format hf          # MambaForCausalLM / Mamba2ForCausalLM

CHECKPOINT is a run's --save directory (the checkpoint ``latest`` names) or one ``iter_*`` directory,
of any --checkpoint-type; or a model directory with a config.json: a Hugging Face MambaForCausalLM /
Mamba2ForCausalLM (e.g. to continue pretraining it with ``--base-model``) or a mamba-ssm model. Both
formats get a copy of the tokenizer files.

* ``mamba-ssm``: what ``MambaLMHeadModel.save_pretrained`` writes. Loads with
  ``MambaLMHeadModel.from_pretrained(OUTPUT_DIR)`` (a local directory is read directly, no hub access)
  and as ``pretrain.py --base-model OUTPUT_DIR`` for continual pretraining. Every configuration
  mamba-ssm can build (hybrids with attention, MLP blocks) exports.
* ``hf``: ``config.json`` + ``model.safetensors`` for ``AutoModelForCausalLM.from_pretrained``:
  Mamba-1 as ``MambaForCausalLM``, Mamba-2 as ``Mamba2ForCausalLM``. Configurations transformers'
  classes cannot express (attention layers, MLP blocks, LayerNorm instead of RMSNorm, some Mamba-2
  options) are refused with the reasons; export those with ``--format mamba-ssm``.
  ``AutoTokenizer`` loads Hugging Face tokenizers from the output; SentencePiece models are copied
  as they are (``tokenizer.model`` is not given a transformers tokenizer config).

The output is written into a temporary directory next to OUTPUT_DIR and renamed into place when
complete; an existing non-empty OUTPUT_DIR is never overwritten.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kotomamba.errors import KotomambaError

if TYPE_CHECKING:
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

FORMATS = ("mamba-ssm", "hf")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPORT_INFO = "kotomamba_export.json"
# Tokenizer files copied from a model directory, besides tokenizer* and *.model.
_TOKENIZER_FILE_NAMES = {"special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt"}

# mamba-ssm mixer options that only shape initialization (or kernels), not the function computed.
_INIT_ONLY_OPTIONS = {
    "Mamba1": {"dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "use_fast_path"},
    "Mamba2": {"dt_min", "dt_max", "dt_init_floor", "A_init_range", "conv_init", "use_mem_eff_path"},
}


class ExportError(KotomambaError, ValueError):
    """A checkpoint cannot be exported as asked; the message names the path, flag or model option."""


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers


def hf_config(model_config: Any, bos: int | None = None, eos: int | None = None, pad: int | None = None,
              embedding_rows: int | None = None):
    """The transformers ``MambaConfig`` / ``Mamba2Config`` computing what mamba-ssm's ``model_config``
    computes, or ExportError listing what transformers cannot express."""
    values = dict(vars(model_config))
    ssm_cfg = dict(values.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    problems = []
    if values.get("attn_layer_idx"):
        problems.append(f"attention layers at {values['attn_layer_idx']} (a hybrid model)")
    if values.get("d_intermediate", 0):
        problems.append(f"MLP blocks (d_intermediate {values['d_intermediate']})")
    if not values.get("rms_norm", True):
        problems.append("LayerNorm (rms_norm false); transformers' Mamba models use RMSNorm")
    if layer not in ("Mamba1", "Mamba2"):
        problems.append(f"mixer {layer!r}; transformers has Mamba-1 and Mamba-2 only")
    for key in _INIT_ONLY_OPTIONS.get(layer, set()) | {"layer_idx", "process_group", "sequence_parallel"}:
        ssm_cfg.pop(key, None)
    d_model = values["d_model"]
    rows = embedding_rows or values["vocab_size"]
    common = dict(
        vocab_size=rows, hidden_size=d_model, num_hidden_layers=values["n_layer"], layer_norm_epsilon=1e-5,
        residual_in_fp32=values.get("residual_in_fp32", True), tie_word_embeddings=values.get("tie_embeddings", True),
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        expand=ssm_cfg.pop("expand", 2), conv_kernel=ssm_cfg.pop("d_conv", 4),
        use_bias=ssm_cfg.pop("bias", False), use_conv_bias=ssm_cfg.pop("conv_bias", True),
    )
    if layer == "Mamba1":
        common.update(state_size=ssm_cfg.pop("d_state", 16), time_step_rank=ssm_cfg.pop("dt_rank", "auto"))
    elif layer == "Mamba2":
        headdim = ssm_cfg.pop("headdim", 64)
        d_inner = common["expand"] * d_model
        d_ssm = ssm_cfg.pop("d_ssm", None)
        if d_ssm is not None and d_ssm != d_inner:
            problems.append(f"a partial SSM (d_ssm {d_ssm} < expand × d_model {d_inner})")
        if ssm_cfg.pop("D_has_hdim", False):
            problems.append("D_has_hdim true")
        if not ssm_cfg.pop("rmsnorm", True):
            problems.append("rmsnorm false (no gated norm before out_proj)")
        if ssm_cfg.pop("norm_before_gate", False):
            problems.append("norm_before_gate true")
        if d_inner % headdim:
            problems.append(f"expand × d_model {d_inner} not divisible by headdim {headdim}")
        dt_limit = ssm_cfg.pop("dt_limit", (0.0, float("inf")))
        common.update(state_size=ssm_cfg.pop("d_state", 128), head_dim=headdim, num_heads=d_inner // headdim,
                      n_groups=ssm_cfg.pop("ngroups", 1), chunk_size=ssm_cfg.pop("chunk_size", 256),
                      time_step_limit=tuple(float(limit) for limit in dt_limit))
    if ssm_cfg and layer in ("Mamba1", "Mamba2"):
        problems.append(f"ssm_cfg option(s) {sorted(ssm_cfg)} without a transformers equivalent")
    if problems:
        raise ExportError(
            f"transformers' {'Mamba2ForCausalLM' if layer == 'Mamba2' else 'MambaForCausalLM'} cannot express "
            f"this model: {'; '.join(problems)}. Export it with --format mamba-ssm (loadable with "
            f"MambaLMHeadModel.from_pretrained and --base-model)"
        )
    from transformers import Mamba2Config, MambaConfig

    return Mamba2Config(**common) if layer == "Mamba2" else MambaConfig(**common)


def hf_state_dict(model: MambaLMHeadModel) -> dict[str, torch.Tensor]:
    """mamba-ssm parameter names -> transformers' (only the embedding is named differently)."""
    renamed = {}
    for name, tensor in model.state_dict().items():
        if name == "backbone.embedding.weight":
            name = "backbone.embeddings.weight"
        renamed[name] = tensor
    return renamed


def _write_hf(model: MambaLMHeadModel, special_ids: dict[str, int | None], directory: Path) -> None:
    from transformers import Mamba2ForCausalLM, MambaForCausalLM

    config = hf_config(model.config, bos=special_ids["bos_token_id"], eos=special_ids["eos_token_id"],
                       pad=special_ids["pad_token_id"], embedding_rows=model.backbone.embedding.num_embeddings)
    config.architectures = ["Mamba2ForCausalLM" if config.model_type == "mamba2" else "MambaForCausalLM"]
    model_class = Mamba2ForCausalLM if config.model_type == "mamba2" else MambaForCausalLM
    with torch.device("meta"):
        hf_model = model_class(config)
    hf_model.load_state_dict(hf_state_dict(model), strict=True, assign=True)
    if config.tie_word_embeddings:
        hf_model.tie_weights()
    hf_model.save_pretrained(str(directory), safe_serialization=True)


# ----------------------------------------------------------------------------------------------
# The command


def export(checkpoint: str, output: str, format: str, dtype: str = "fp32") -> Path:
    """Write CHECKPOINT's model in ``format`` ("mamba-ssm" or "hf") to ``output``; returns the directory.

    CHECKPOINT is a training checkpoint, or a model directory (a config.json): mamba-ssm's format, or
    a Hugging Face MambaForCausalLM / Mamba2ForCausalLM."""
    if format not in FORMATS:
        raise ExportError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    target = Path(output)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"{target} already exists and is not an empty directory; remove it or choose another output")
    model, special_ids, tokenizer_files, provenance = _load_source(checkpoint)
    if format == "hf":
        hf_config(model.config)  # refuse before writing anything
    model = model.to(DTYPES[dtype])
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        temporary.mkdir()
        if format == "mamba-ssm":
            # mamba-ssm's own writer: config.json + pytorch_model.bin, a plain state dict of tensors (loadable
            # with torch.load(weights_only=True)); from_pretrained reads no other weights file.
            model.save_pretrained(str(temporary))
        else:
            _write_hf(model, special_ids, temporary)
        for path in tokenizer_files:
            shutil.copy2(path, temporary / path.name)
        provenance.update(format=format, dtype=dtype, **special_ids)
        (temporary / EXPORT_INFO).write_text(json.dumps(provenance, indent=2))
        _give_files_the_usual_mode(temporary)
        if target.exists():
            target.rmdir()  # empty, checked above
        os.rename(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target


def _give_files_the_usual_mode(directory: Path) -> None:
    """Every exported file readable as the umask allows, like its siblings (safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _load_source(checkpoint: str) -> tuple[MambaLMHeadModel, dict[str, int | None], list[Path], dict[str, Any]]:
    """(fp32 model on the CPU, its special token ids, tokenizer files to copy, provenance) of CHECKPOINT."""
    from kotomamba.model_loading import load_model_from_checkpoint
    from kotomamba.checkpoint_layout import is_training_checkpoint
    from kotomamba.model import load_base_model
    from megatron_lm.tokenizer import tokenizer_files

    directory = Path(checkpoint)
    # A directory that is neither a checkpoint nor a model is reported by the checkpoint reader.
    if is_training_checkpoint(directory) or not (directory / "config.json").is_file():
        model, info = load_model_from_checkpoint(checkpoint, torch.device("cpu"))
        tokenizer = _saved_tokenizer(info)
        special_ids = {"bos_token_id": tokenizer.bos if tokenizer else None,
                       "eos_token_id": tokenizer.eod if tokenizer else None,
                       "pad_token_id": tokenizer.pad if tokenizer else None}
        provenance = {"checkpoint": info["checkpoint_dir"], "iteration": info["iteration"],
                      "tokenizer_type": info["tokenizer_type"], "tokenizer_name": info["tokenizer_name"]}
        return model, special_ids, tokenizer_files(info["tokenizer_type"], info["tokenizer_model"]), provenance
    model = load_base_model(checkpoint, device="cpu", dtype=torch.float32)  # validates config.json
    config = json.loads((directory / "config.json").read_text())
    source_format = "hf" if "model_type" in config else "mamba-ssm"
    # Special token ids: a Hugging Face config.json has them; our mamba-ssm exports record them in EXPORT_INFO.
    known = config if source_format == "hf" else _read_export_info(directory)
    special_ids = {key: known.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    files = [path for place in (directory, directory / "tokenizer") if place.is_dir()
             for path in sorted(place.iterdir()) if path.is_file() and _is_tokenizer_file(path.name)]
    return model, special_ids, files, {"source": str(directory), "source_format": source_format}


def _read_export_info(directory: Path) -> dict[str, Any]:
    path = directory / EXPORT_INFO
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"cannot read {path}: {error}") from None
    return values if isinstance(values, dict) else {}


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith("tokenizer") or name.endswith(".model") or name in _TOKENIZER_FILE_NAMES


def _saved_tokenizer(info: dict[str, Any]) -> Any:
    """The checkpoint's tokenizer (for the special token ids), or None when it has no saved files."""
    from megatron_lm.tokenizer import build_tokenizer

    if info["tokenizer_type"] == "NullTokenizer":
        return build_tokenizer("NullTokenizer", vocab_size=info["vocab_size"])
    if info["tokenizer_model"] is None or not Path(info["tokenizer_model"]).exists():
        return None
    return build_tokenizer(info["tokenizer_type"], info["tokenizer_model"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kotomamba.convert",
        description="Export a kotomamba training checkpoint (or convert a model directory) as a mamba-ssm or "
                    "Hugging Face transformers model.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a run's --save directory (uses its latest checkpoint), one iter_* directory, or a "
                             "Hugging Face Mamba/Mamba-2 or mamba-ssm model directory")
    parser.add_argument("output", metavar="OUTPUT_DIR", help="where to write the model (must not exist, or be empty)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="mamba-ssm: config.json + pytorch_model.bin (MambaLMHeadModel.from_pretrained, "
                             "--base-model); hf: MambaForCausalLM / Mamba2ForCausalLM with safetensors "
                             "(AutoModelForCausalLM.from_pretrained)")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                        help="dtype of the written weights (default fp32, the training master weights)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        target = export(args.checkpoint, args.output, args.format, args.dtype)
    except KotomambaError as error:
        print(f"kotomamba.convert: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"kotomamba.convert: error: cannot write {args.output}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} model to {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
