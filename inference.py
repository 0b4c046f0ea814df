"""Generate text from a trained model: a kotomamba training checkpoint, a mamba-ssm model directory
(config.json + model.safetensors / pytorch_model.bin) or a Hugging Face Mamba / Mamba-2 directory.

    python inference.py --load DIR --prompt "東京は" --max-new-tokens 64 --temperature 0.7 --top-p 0.9
    python inference.py --load DIR --prompt-file prompts.jsonl --num-samples 4 --batch-size 32 --output out.jsonl
    echo "Once upon a time" | python inference.py --load DIR --greedy

Every format is turned into mamba-ssm's MambaLMHeadModel and decoded by kotomamba.generation
(mamba-ssm's recurrent inference cache; CUDA graphs on GPU, reference kernels on CPU). The tokenizer
is the one saved with the model (a tokenizer/ subdirectory, or tokenizer files next to config.json)
unless --tokenizer-type / --tokenizer-model say otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from kotomamba.errors import KotomambaError
from megatron_lm.tokenizer import TOKENIZER_TYPES

if TYPE_CHECKING:
    import torch
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    from megatron_lm.tokenizer import Tokenizer

PROG = "inference.py"
_SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


class InferenceInputError(KotomambaError, ValueError):
    """A flag, file or prompt given to inference.py is unusable; the message names it."""


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, metavar="DIR",
                        help="kotomamba checkpoint directory (--save dir or one iter_* dir), mamba-ssm model "
                             "directory, or Hugging Face Mamba/Mamba-2 directory.")
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                        help="Override the tokenizer type (default: the one saved with the model, or inferred "
                             "from --tokenizer-model: .model -> SentencePieceTokenizer, else HuggingFaceTokenizer).")
    parser.add_argument("--tokenizer-model", default=None, metavar="PATH",
                        help="Override the tokenizer: SentencePiece .model, tokenizer.json or a HF tokenizer directory.")
    parser.add_argument("--allow-other-tokenizer", action="store_true",
                        help="Use --tokenizer-model even though its checksum differs from the tokenizer the "
                             "kotomamba checkpoint records as trained with (e.g. the same vocabulary re-saved).")
    prompts = parser.add_argument_group("prompts (default: standard input, one prompt per line)")
    prompts.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                         help="A prompt; repeat for several.")
    prompts.add_argument("--prompt-file", default=None, metavar="FILE",
                         help="One prompt per line, or JSONL (*.jsonl) with a \"prompt\" or \"text\" string per line.")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=128)
    sampling.add_argument("--temperature", type=float, default=1.0)
    sampling.add_argument("--top-k", type=int, default=0, help="Keep the k most likely tokens (0 = off).")
    sampling.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (1 = off).")
    sampling.add_argument("--min-p", type=float, default=0.0,
                          help="Drop tokens less likely than min-p times the most likely one (0 = off).")
    sampling.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty (1 = off).")
    sampling.add_argument("--greedy", action="store_true", help="Argmax decoding (ignores temperature and filters).")
    sampling.add_argument("--seed", type=int, default=1234,
                          help="Seed of the sampling; each (prompt, sample) has its own stream (default 1234).")
    sampling.add_argument("--num-samples", type=int, default=1, help="Completions per prompt.")
    sampling.add_argument("--batch-size", type=int, default=1, help="Sequences decoded together.")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available).")
    runtime.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                         help="Weights dtype (default: bfloat16 on GPU, float32 on CPU).")
    runtime.add_argument("--no-cuda-graph", action="store_true", help="Step eagerly instead of replaying CUDA graphs.")
    parser.add_argument("--output", default=None, metavar="FILE.jsonl",
                        help="Write one JSON object per completion: prompt, completion, token counts, timing.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; usage errors exit with code 2 and an ``inference.py: error:`` line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tokenizer_type == "NullTokenizer" and args.tokenizer_model is not None:
        parser.error("--tokenizer-type NullTokenizer takes no --tokenizer-model (its vocabulary is the model's)")
    if args.output is not None:
        output = Path(args.output)
        if output.is_dir() or not output.parent.is_dir():
            parser.error(f"--output {args.output}: not a file in an existing directory")
    return args


# ----------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompt:
    text: str
    source: str  # where it came from, for error messages: "--prompt #2", "prompts.jsonl:7"


def read_prompts(prompts: list[str] | None, prompt_file: str | None, stdin: TextIO) -> list[Prompt]:
    """Prompts from --prompt values, then --prompt-file; from ``stdin`` when neither is given.

    Text input has one prompt per line (blank lines skipped); *.jsonl files have one JSON object per
    line with a "prompt" (or "text") string, which may span several lines of text.
    """
    result = []
    for number, text in enumerate(prompts or [], start=1):
        if not text:
            raise InferenceInputError(f"--prompt #{number} is empty")
        result.append(Prompt(text, f"--prompt #{number}"))
    if prompt_file is not None:
        try:
            content = Path(prompt_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InferenceInputError(f"--prompt-file {prompt_file}: no such file") from None
        except (OSError, UnicodeDecodeError) as error:
            raise InferenceInputError(f"--prompt-file {prompt_file}: cannot read it: {error}") from None
        if prompt_file.endswith(".jsonl"):
            result += _jsonl_prompts(content, prompt_file)
        else:
            result += _line_prompts(content, prompt_file)
        if not result:
            raise InferenceInputError(f"--prompt-file {prompt_file} holds no prompts")
    if prompts is None and prompt_file is None:
        if stdin.isatty():
            print(f"{PROG}: reading prompts from standard input, one per line (end with Ctrl-D)", file=sys.stderr)
        result = _line_prompts(stdin.read(), "<stdin>")
        if not result:
            raise InferenceInputError("no prompts: give --prompt, --prompt-file, or prompt lines on standard input")
    return result


def _line_prompts(content: str, name: str) -> list[Prompt]:
    return [Prompt(line, f"{name}:{number}") for number, line in enumerate(content.splitlines(), start=1)
            if line.strip()]


def _jsonl_prompts(content: str, name: str) -> list[Prompt]:
    result = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InferenceInputError(f"{name}:{number}: not valid JSON ({error.msg})") from None
        text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise InferenceInputError(f'{name}:{number}: expected an object with a "prompt" (or "text") string')
        if not text:
            raise InferenceInputError(f"{name}:{number}: empty prompt")
        result.append(Prompt(text, f"{name}:{number}"))
    return result


# ----------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedModel:
    model: MambaLMHeadModel
    tokenizer: Tokenizer
    description: str  # the format and where it came from, for the log line


def load_model_and_tokenizer(path: str, device: torch.device, dtype: torch.dtype, tokenizer_type: str | None = None,
                             tokenizer_model: str | None = None, allow_other_tokenizer: bool = False) -> LoadedModel:
    """The model in ``path`` (any supported format) on ``device``/``dtype``, and its tokenizer.

    ``tokenizer_type`` / ``tokenizer_model`` override the tokenizer saved with the model; a type
    alone picks how the saved files are read (e.g. GPTSentencePieceTokenizer for tokenizer.model).
    """
    from kotomamba.checkpoint_layout import is_training_checkpoint
    from kotomamba.model import CheckpointError, load_base_model, mamba_ssm_model_from_hf, read_weights

    directory = Path(path)
    if not directory.exists():
        raise InferenceInputError(f"--load {path}: no such directory")
    if not directory.is_dir():
        raise InferenceInputError(f"--load {path}: not a directory")
    if is_training_checkpoint(directory):
        model, info = _load_training_checkpoint(directory, device, dtype)
        tokenizer = _checkpoint_tokenizer(info, directory, model.config.vocab_size, tokenizer_type, tokenizer_model,
                                          allow_other_tokenizer)
        loaded = LoadedModel(model, tokenizer, f"kotomamba checkpoint {directory}")
    else:
        config = _read_json(directory / "config.json", directory)
        model_type = config.get("model_type")
        if model_type is None and "d_model" not in config:
            raise CheckpointError(f"{directory / 'config.json'} is neither a mamba-ssm config (no d_model) nor a "
                                  f"Hugging Face config (no model_type)")
        tokenizer = _directory_tokenizer(directory, config.get("vocab_size"), tokenizer_type, tokenizer_model)
        if model_type is None:
            model = load_base_model(str(directory), tokenizer.vocab_size, device=device, dtype=dtype)
            loaded = LoadedModel(model.eval(), tokenizer, f"mamba-ssm model {directory}")
        elif model_type in ("mamba", "mamba2"):
            weights, state_dict = read_weights(directory)
            model = mamba_ssm_model_from_hf(config, state_dict, device, dtype, str(weights))
            loaded = LoadedModel(model, tokenizer, f"Hugging Face {model_type} model {directory}")
        else:
            raise CheckpointError(f"{directory / 'config.json'}: model_type {model_type!r} is not a Mamba model "
                                  f"(expected 'mamba' or 'mamba2')")
    rows = loaded.model.backbone.embedding.num_embeddings
    if loaded.tokenizer.vocab_size > rows:
        raise InferenceInputError(
            f"tokenizer {loaded.tokenizer.name} has {loaded.tokenizer.vocab_size} tokens but the model in {path} has "
            f"only {rows} embedding rows: it was not trained with this tokenizer (--tokenizer-model)")
    return loaded


def _load_training_checkpoint(directory: Path, device: torch.device, dtype: torch.dtype
                              ) -> tuple[MambaLMHeadModel, dict[str, Any]]:
    import torch

    from kotomamba.model_loading import TrainingCheckpointError, load_model_from_checkpoint

    # An unreadable checkpoint is the user's input problem: one line, exit 2.
    try:
        model, info = load_model_from_checkpoint(str(directory), torch.device("cpu"))
    except TrainingCheckpointError as error:
        raise InferenceInputError(str(error)) from None
    from kotomamba.model import model_from_state_dict

    # Rebuilt from the state dict so that device and dtypes are those of mamba-ssm's constructor.
    return model_from_state_dict(model.config, model.state_dict(), device, dtype, str(directory)).eval(), info


def _read_json(path: Path, directory: Path) -> dict[str, Any]:
    from kotomamba.model import CheckpointError

    if not path.is_file():
        raise CheckpointError(f"--load {directory}: no {path.name} (expected a kotomamba checkpoint, a mamba-ssm "
                              f"model directory or a Hugging Face Mamba directory)")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return values


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _directory_tokenizer(directory: Path, config_vocab_size: Any, tokenizer_type: str | None,
                         tokenizer_model: str | None) -> Tokenizer:
    if tokenizer_model is not None or tokenizer_type == "NullTokenizer":
        return _override_tokenizer(tokenizer_type, tokenizer_model, config_vocab_size, directory)
    found = _find_tokenizer(directory, tokenizer_type)
    if found is None:
        raise InferenceInputError(
            f"no tokenizer saved with the model in {directory} (looked for tokenizer/, tokenizer.json, "
            f"tokenizer_config.json, tokenizer.model): give --tokenizer-model (and --tokenizer-type)")
    return _build_tokenizer(*found)


def _checkpoint_tokenizer(info: dict[str, Any], directory: Path, config_vocab_size: int, tokenizer_type: str | None,
                          tokenizer_model: str | None, allow_other_tokenizer: bool = False) -> Tokenizer:
    if tokenizer_model is not None or tokenizer_type == "NullTokenizer":
        from megatron_lm.tokenizer import same_tokenizer

        tokenizer = _override_tokenizer(tokenizer_type, tokenizer_model, config_vocab_size, directory)
        trained_with = info.get("tokenizer_name")
        if trained_with and not same_tokenizer(trained_with, tokenizer.name) and not allow_other_tokenizer:
            raise InferenceInputError(
                f"--tokenizer-model {tokenizer_model} is {tokenizer.name}, but the checkpoint {directory} was trained "
                f"with {trained_with} (its copy: {info.get('tokenizer_dir')}); drop --tokenizer-model to use that "
                f"one, or add --allow-other-tokenizer if this one really encodes text the same way")
        return tokenizer
    saved_type = tokenizer_type or info.get("tokenizer_type")
    if saved_type == "NullTokenizer":
        return _override_tokenizer("NullTokenizer", None, config_vocab_size, directory)
    if info.get("tokenizer_dir"):
        found = _find_tokenizer(Path(info["tokenizer_dir"]), saved_type)
        if found is not None:
            return _build_tokenizer(*found)
    original = info.get("tokenizer_model")
    if saved_type and original and Path(original).exists():
        return _build_tokenizer(saved_type, original)
    raise InferenceInputError(
        f"the checkpoint {directory} has no saved tokenizer files and its training tokenizer "
        f"({saved_type} {original}) is not available: give --tokenizer-model (and --tokenizer-type)")


def _override_tokenizer(tokenizer_type: str | None, tokenizer_model: str | None, config_vocab_size: Any,
                        directory: Path) -> Tokenizer:
    if tokenizer_type == "NullTokenizer":
        if not isinstance(config_vocab_size, int) or config_vocab_size < 2:
            raise InferenceInputError(f"--tokenizer-type NullTokenizer needs the model's vocab_size; {directory} "
                                      f"has {config_vocab_size!r}")
        # Training with NullTokenizer(V) gives the model vocab_size V + 1 (ids 0..V-1 plus eod = V).
        return _build_tokenizer("NullTokenizer", None, vocab_size=config_vocab_size - 1)
    assert tokenizer_model is not None
    if tokenizer_type is None:
        tokenizer_type = "SentencePieceTokenizer" if tokenizer_model.endswith(".model") else "HuggingFaceTokenizer"
    return _build_tokenizer(tokenizer_type, tokenizer_model)


def _find_tokenizer(directory: Path, tokenizer_type: str | None) -> tuple[str, str] | None:
    """(type, model path) of tokenizer files in ``directory``/tokenizer or ``directory``, or None."""
    for place in (directory / "tokenizer", directory):
        if not place.is_dir():
            continue
        sentencepiece = place / "tokenizer.model"
        if not sentencepiece.is_file():
            candidates = sorted(place.glob("*.model"))
            sentencepiece = candidates[0] if len(candidates) == 1 else None
        if tokenizer_type in _SENTENCEPIECE_TYPES and sentencepiece is not None:
            return tokenizer_type, str(sentencepiece)
        if tokenizer_type in (None, "HuggingFaceTokenizer"):
            if (place / "tokenizer_config.json").is_file():
                return "HuggingFaceTokenizer", str(place)
            if (place / "tokenizer.json").is_file():  # a lone tokenizer.json, without AutoTokenizer's config
                return "HuggingFaceTokenizer", str(place / "tokenizer.json")
        if tokenizer_type is None and sentencepiece is not None:
            return "SentencePieceTokenizer", str(sentencepiece)
    return None


def _build_tokenizer(tokenizer_type: str, tokenizer_model: str | None, vocab_size: int | None = None) -> Tokenizer:
    from megatron_lm.tokenizer import build_tokenizer

    return build_tokenizer(tokenizer_type, tokenizer_model, vocab_size=vocab_size)


def stop_token_ids(tokenizer: Tokenizer) -> set[int]:
    """End-of-document id, plus the SentencePiece model's own eos where the tokenizer has a distinct one."""
    ids = {tokenizer.eod}
    eos = getattr(tokenizer, "eos", None)
    if isinstance(eos, int):
        ids.add(eos)
    return ids


# ----------------------------------------------------------------------------------------------
# Output


def completion_text(tokenizer: Tokenizer, prompt_ids: list[int], completion_ids: list[int]) -> str:
    """The completion as it reads after the prompt: decoded together with the prompt, prompt text
    removed, so that SentencePiece's word-initial spaces and split multi-byte characters come out right."""
    prefix = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(list(prompt_ids) + list(completion_ids))
    return full[len(prefix):] if full.startswith(prefix) else tokenizer.decode(completion_ids)


class _TextStream:
    """Prints a completion as it grows, holding back text that may still change (a partial character)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], out: TextIO) -> None:
        self.tokenizer, self.prompt_ids, self.out = tokenizer, prompt_ids, out
        self.tokens: list[int] = []
        self.printed = ""

    def push(self, token: int) -> None:
        self.tokens.append(token)
        self._flush(final=False)

    def close(self) -> None:
        self._flush(final=True)
        self.out.write("\n")
        self.out.flush()

    def _flush(self, final: bool) -> None:
        text = completion_text(self.tokenizer, self.prompt_ids, self.tokens)
        if (final or not text.endswith("\ufffd")) and text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text


# ----------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None, stdin: TextIO | None = None) -> int:
    args = parse_args(argv)
    from kotomamba.cli import INPUT_ERROR, USAGE_ERROR, report_error
    from kotomamba.kernels import KernelRoutingError, KernelsUnavailableError

    try:
        return _run(args, sys.stdin if stdin is None else stdin)
    except (KernelsUnavailableError, KernelRoutingError) as error:  # the machine, not the input
        return report_error(PROG, error, INPUT_ERROR)
    except KotomambaError as error:
        return report_error(PROG, error, USAGE_ERROR)


def _run(args: argparse.Namespace, stdin: TextIO) -> int:
    import torch

    from kotomamba.generation import Decoder, SamplingSettings
    from kotomamba.kernels import select_kernel_backend

    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                greedy=args.greedy)
    prompts = read_prompts(args.prompt, args.prompt_file, stdin)
    device = _device(args.device)
    dtype = getattr(torch, _DTYPES[args.dtype] if args.dtype else ("bfloat16" if device.type == "cuda" else "float32"))
    select_kernel_backend(device)  # before anything imports mamba_ssm
    if device.type == "cpu":
        from kotomamba.distributed import configure_cpu_threads

        configure_cpu_threads()

    loaded = load_model_and_tokenizer(args.load, device, dtype, args.tokenizer_type, args.tokenizer_model,
                                      args.allow_other_tokenizer)
    tokenizer = loaded.tokenizer
    prompt_ids = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt.text)
        if not ids:
            raise InferenceInputError(f"{prompt.source}: the prompt encodes to no tokens")
        prompt_ids.append(ids)
    decoder = Decoder(loaded.model, vocab_size=tokenizer.vocab_size, eos_token_ids=stop_token_ids(tokenizer),
                      cuda_graph=not args.no_cuda_graph)
    parameters = sum(p.numel() for p in loaded.model.parameters())
    print(f"{PROG}: {loaded.description}: {parameters / 1e6:.1f}M parameters, {str(dtype).removeprefix('torch.')}, {device}"
          f"{', CUDA graphs' if decoder.cuda_graph else ''}; tokenizer {tokenizer.name}", file=sys.stderr)

    stream = None
    if len(prompts) * args.num_samples == 1:
        sys.stdout.write(prompts[0].text)
        stream = _TextStream(tokenizer, prompt_ids[0], sys.stdout)
    completions, stats = decoder.generate(prompt_ids, settings, batch_size=args.batch_size,
                                          num_samples=args.num_samples, seed=args.seed,
                                          on_token=(lambda _, token: stream.push(token)) if stream else None)
    records = []
    for completion in completions:
        prompt = prompts[completion.prompt_index]
        text = completion_text(tokenizer, prompt_ids[completion.prompt_index], completion.tokens)
        records.append({
            "prompt_index": completion.prompt_index, "sample_index": completion.sample_index,
            "prompt": prompt.text, "completion": text,
            "prompt_tokens": len(prompt_ids[completion.prompt_index]), "completion_tokens": len(completion.tokens),
            "stop_reason": completion.stop_reason,
            "prefill_seconds": round(completion.prefill_seconds, 6), "decode_seconds": round(completion.decode_seconds, 6),
        })
        if stream is None:
            print(f"[prompt {completion.prompt_index}, sample {completion.sample_index}, {completion.stop_reason}]")
            print(prompt.text + text, flush=True)
    if stream is not None:
        stream.close()
    if args.output is not None:
        with open(args.output, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{PROG}: {len(completions)} completion(s), {stats.generated_tokens} new tokens in {stats.seconds:.2f} s: "
          f"{stats.tokens_per_second:.1f} tokens/s (prefill {stats.prefill_seconds:.2f} s, decode "
          f"{stats.decode_tokens_per_second:.1f} tokens/s)", file=sys.stderr)
    return 0


def _device(name: str | None) -> torch.device:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InferenceInputError(f"--device {name!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise InferenceInputError(f"--device {name!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceInputError(f"--device {name}: no CUDA GPU is available")
    return device


if __name__ == "__main__":
    sys.exit(main())
