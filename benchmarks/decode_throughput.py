"""Decode throughput of kotomamba.generation (mamba-ssm's recurrent steps, CUDA graphs on GPU) against
Hugging Face ``generate`` on the same weights.

For each preset a transformers MambaForCausalLM (Mamba2ForCausalLM for mamba2-* presets) of the
preset's shape is randomly initialized, and kotomamba.model's converter (the one inference.py uses) turns its weights into
mamba-ssm's MambaLMHeadModel, so both decode exactly the same model. Both decode greedily, without
stopping at EOS, from a prompt of --prompt-length random tokens, --new-tokens tokens per sequence.

Decode tokens/s counts only the tokens produced by decode steps, batch x (new_tokens - 1), over the
time those steps took: ours from GenerationStats.decode_seconds, Hugging Face's as the time of
generate(new_tokens) minus the time of generate(1) (its prefill). End-to-end tokens/s is
batch x new_tokens over prefill + decode. Each number is the best of --repeats runs after a
warm-up run (which captures our CUDA graphs).

    python benchmarks/decode_throughput.py                      # GPU: 130m and 2.8b at batch 1 and 64
    python benchmarks/decode_throughput.py --tiny --report /tmp/benchmarks.md   # CPU smoke check
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.report import BENCHMARKS_MD, markdown_table, write_section  # noqa: E402

TINY_PRESET = {"d_model": 64, "n_layer": 2, "ssm_cfg": {"layer": "Mamba1", "d_state": 16, "d_conv": 4, "expand": 2}}
HF_VOCAB = 50280  # the GPT-NeoX vocabulary as padded in state-spaces/mamba-*-hf


def hf_model(preset: dict, vocab_size: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialized transformers Mamba / Mamba-2 causal LM with the preset's shape."""
    import transformers

    ssm = preset["ssm_cfg"]
    common = dict(vocab_size=vocab_size, hidden_size=preset["d_model"], num_hidden_layers=preset["n_layer"],
                  state_size=ssm["d_state"], conv_kernel=ssm["d_conv"], expand=ssm["expand"],
                  tie_word_embeddings=True, eos_token_id=None, pad_token_id=0, bos_token_id=0)
    if ssm["layer"] == "Mamba2":
        headdim = ssm["headdim"]
        config = transformers.Mamba2Config(num_heads=ssm["expand"] * preset["d_model"] // headdim, head_dim=headdim,
                                           n_groups=1, chunk_size=256, **common)
        model_class = transformers.Mamba2ForCausalLM
    else:
        config = transformers.MambaConfig(time_step_rank=math.ceil(preset["d_model"] / 16), **common)
        model_class = transformers.MambaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config)
    model.generation_config.eos_token_id = None
    return model.to(dtype).eval()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_hf(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(best prefill seconds, best decode seconds, generated tokens) of Hugging Face greedy generate."""
    def run(count: int) -> tuple[float, torch.Tensor]:
        _synchronize(prompt.device)
        start = time.perf_counter()
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=count,
                                min_new_tokens=count, do_sample=False, pad_token_id=0)
        _synchronize(prompt.device)
        return time.perf_counter() - start, output[:, prompt.shape[1]:]

    run(new_tokens)  # warm-up
    prefill = min(run(1)[0] for _ in range(repeats))
    total, tokens = min((run(new_tokens) for _ in range(repeats)), key=lambda result: result[0])
    return prefill, max(total - prefill, 1e-9), tokens


def time_ours(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int
              ) -> tuple[float, float, torch.Tensor]:
    """(best prefill seconds, best decode seconds, generated tokens) of kotomamba.generation, greedy."""
    from kotomamba.generation import Decoder, SamplingSettings

    decoder = Decoder(model)
    settings = SamplingSettings(max_new_tokens=new_tokens, greedy=True)
    prompts = prompt.tolist()
    batch = len(prompts)
    decoder.generate(prompts, settings, batch_size=batch)  # warm-up, captures the CUDA graph
    runs = [decoder.generate(prompts, settings, batch_size=batch) for _ in range(repeats)]
    prefill = min(stats.prefill_seconds for _, stats in runs)
    completions, stats = min(runs, key=lambda run: run[1].decode_seconds)
    return prefill, stats.decode_seconds, torch.tensor([c.tokens for c in completions])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="130m,2.8b", help="Comma-separated kotomamba.model presets.")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke check: a 2-layer d_model 64 model, float32, few tokens; writes no report "
                             "unless --report is given.")
    parser.add_argument("--report", type=Path, default=None,
                        help=f"Markdown file to write the section to (default {BENCHMARKS_MD}, none with --tiny).")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from kotomamba.kernels import select_kernel_backend

    select_kernel_backend(device)  # before anything imports mamba_ssm (transformers does when it is installed)
    from kotomamba.model import MODEL_PRESETS, mamba_ssm_model_from_hf

    if args.tiny:
        presets, vocab, dtype = {"tiny": TINY_PRESET}, 512, torch.float32
        batch_sizes, prompt_length, new_tokens, repeats = [1, 4], 8, 8, 1
    else:
        unknown = [name for name in args.models.split(",") if name not in MODEL_PRESETS]
        if unknown:
            parser.error(f"--models: unknown preset(s) {unknown}; choose from {', '.join(MODEL_PRESETS)}")
        presets = {name: MODEL_PRESETS[name] for name in args.models.split(",")}
        vocab, dtype = HF_VOCAB, getattr(torch, args.dtype)
        batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
        prompt_length, new_tokens, repeats = args.prompt_length, args.new_tokens, args.repeats

    rows = []
    for name, preset in presets.items():
        hf = hf_model(preset, vocab, device, dtype)
        ours = mamba_ssm_model_from_hf(hf.config.to_dict(), hf.state_dict(), device, dtype, f"preset {name}")
        for batch in batch_sizes:
            prompt = torch.randint(0, vocab, (batch, prompt_length), generator=torch.Generator().manual_seed(batch))
            prompt = prompt.to(device)
            with torch.inference_mode():
                ours_prefill, ours_decode, ours_tokens = time_ours(ours, prompt, new_tokens, repeats)
                hf_prefill, hf_decode, hf_tokens = time_hf(hf, prompt, new_tokens, repeats)
            decode_count = batch * (new_tokens - 1)
            equal = ours_tokens.cpu() == hf_tokens.cpu()
            same = int(equal.all(dim=1).sum())
            # Tokens each sequence shares with HF's before their first difference.
            leading = float(equal.int().cumprod(dim=1).sum(dim=1).float().mean())
            row = [name, batch,
                   f"{decode_count / ours_decode:,.0f}", f"{decode_count / hf_decode:,.0f}",
                   f"{hf_decode / ours_decode:.2f}x",
                   f"{batch * new_tokens / (ours_prefill + ours_decode):,.0f}",
                   f"{batch * new_tokens / (hf_prefill + hf_decode):,.0f}",
                   f"{same}/{batch}", f"{leading:.1f}/{new_tokens}"]
            print(" | ".join(str(cell) for cell in row), flush=True)
            rows.append(row)
        del hf, ours
        if device.type == "cuda":
            torch.cuda.empty_cache()

    header = ["model", "batch", "ours decode tok/s", "HF decode tok/s", "speed-up", "ours end-to-end tok/s",
              "HF end-to-end tok/s", "identical greedy sequences", "equal leading tokens (mean)"]
    body = (f"Random weights, {dtype}, {device}; prompt {prompt_length} random tokens, {new_tokens} new tokens per "
            f"sequence, greedy, no EOS; best of {repeats} after a warm-up. Ours: `kotomamba.generation.Decoder` "
            f"({'CUDA graphs' if device.type == 'cuda' else 'eager steps, reference kernels'}); HF: "
            f"transformers `generate` on the same weights. Identical greedy sequences can differ in low precision "
            f"(different kernels round differently, and random weights give near-tied logits).\n\n"
            + markdown_table(header, rows))
    report = args.report or (None if args.tiny else BENCHMARKS_MD)
    if report is not None:
        write_section("decode_throughput", "Decode throughput (kotomamba.generation vs Hugging Face generate)",
                      body, path=report)
        print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
