"""Selective-scan kernels side by side: kotomamba's Triton scan against mamba-ssm's CUDA kernel.

Both are called through the compiled-extension contract that mamba-ssm's Mamba-1 block
(``MambaInnerFn``) uses in training: bf16 u/delta/z, B and C of shape (batch, 1, d_state, seqlen),
fp32 A, D and delta_bias, softplus on, the forward with the z gate, the backward recomputing the
gated output. Times are medians of ``triton.testing.do_bench`` (after its warm-up), in milliseconds.

Floors, for each pass: the fewest bytes it must move (each input read once, each output written
once, bf16) over the copy bandwidth measured here, and its exponentials (batch x dim x seqlen x
d_state: the forward needs them once, and the backward at least once more, unless it stores them)
over the special-function units' rate (16 per multiprocessor per clock at the maximum SM clock).
"% floor" is the larger floor over our time.

    python benchmarks/scan_kernels.py                           # the shape plan below, on a GPU
    python benchmarks/scan_kernels.py --sweep                   # tile configurations at one 2.8b shape
    python benchmarks/scan_kernels.py --parts-sweep             # the sequence in parts, at PARTS_SHAPES
    python benchmarks/scan_kernels.py --report docs/benchmarks.md
    ncu --clock-control none -k regex:_selective_scan python benchmarks/scan_kernels.py --once
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.report import BENCHMARKS_MD, markdown_table, write_section  # noqa: E402

D_INNER = {"130m": 1536, "1.4b": 4096, "2.8b": 5120}
D_STATE = 16
PLAN = [(mb, 2048) for mb in (1, 4, 8, 16)] + [(1, 8192), (2, 8192), (1, 16384), (2, 16384)]
SWEEP_SHAPE = ("2.8b", 8, 2048)


def scan_inputs(d_inner: int, batch: int, seqlen: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Inputs shaped and scaled like one Mamba-1 layer's scan in training."""
    generator = torch.Generator(device=device).manual_seed(0)

    def normal(*shape, scale=1.0, dtype=torch.bfloat16):
        return (scale * torch.randn(*shape, device=device, generator=generator)).to(dtype)

    return {
        "u": normal(batch, d_inner, seqlen),
        "delta": normal(batch, d_inner, seqlen, scale=0.5),
        "A": -torch.arange(1, D_STATE + 1, device=device, dtype=torch.float32).repeat(d_inner, 1),
        "B": normal(batch, 1, D_STATE, seqlen),
        "C": normal(batch, 1, D_STATE, seqlen),
        "D": torch.ones(d_inner, device=device),
        "z": normal(batch, d_inner, seqlen),
        "delta_bias": normal(d_inner, scale=0.5, dtype=torch.float32) - 4.0,
        "dout": normal(batch, d_inner, seqlen),
    }


def runners(extension, inputs: dict[str, torch.Tensor]):
    """(forward, backward) closures over one extension-style module (fwd/bwd)."""
    i = inputs
    forward_args = (i["u"], i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"], i["delta_bias"], True)
    out, x, out_z = extension.fwd(*forward_args)

    def forward():
        return extension.fwd(*forward_args)

    def backward():
        return extension.bwd(i["u"], i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"], i["delta_bias"], i["dout"],
                             x, out, None, True, True)

    return forward, backward, out_z


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    import triton

    source = torch.empty(2 ** 30, dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(source)
    milliseconds = triton.testing.do_bench(lambda: target.copy_(source), warmup=25, rep=200, return_mode="median")
    return 2 * source.numel() / (milliseconds * 1e-3)


def exponential_rate(device: torch.device) -> float:
    """Exponentials per second of the special-function units: 16 per SM per clock at the maximum clock."""
    try:
        clock_mhz = float(subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits",
                                          f"--id={device.index or 0}"], capture_output=True, text=True,
                                         timeout=30).stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        clock_mhz = 1980.0
    return 16 * torch.cuda.get_device_properties(device).multi_processor_count * clock_mhz * 1e6


def floors(d_inner: int, batch: int, seqlen: int, bandwidth: float, exp_rate: float) -> dict[str, float]:
    """Milliseconds below which no kernel can do each pass (see the module docstring)."""
    channel_elements = batch * d_inner * seqlen
    state_elements = batch * D_STATE * seqlen
    forward_bytes = 2 * (4 * channel_elements + 2 * state_elements)  # u, delta, z in; out_z out; B, C in
    backward_bytes = 2 * (8 * channel_elements + 4 * state_elements)  # u, delta, z, dout in; du, ddelta, dz, out_z out
    exp_ms = channel_elements * D_STATE / exp_rate * 1e3
    return {"forward": max(forward_bytes / bandwidth * 1e3, exp_ms),
            "backward": max(backward_bytes / bandwidth * 1e3, exp_ms),
            "memory_total": (forward_bytes + backward_bytes) / bandwidth * 1e3, "exp_total": 2 * exp_ms}


def measure(model: str, batch: int, seqlen: int, ours, theirs, bandwidth: float, exp_rate: float) -> dict:
    import triton

    device = torch.device("cuda")
    inputs = scan_inputs(D_INNER[model], batch, seqlen, device)
    row = {"model": model, "batch": batch, "seqlen": seqlen}
    results = {}
    for name, extension in (("ours", ours), ("mamba", theirs)):
        forward, backward, out_z = runners(extension, inputs)
        grads = backward()
        results[name] = (out_z, grads)
        row[f"{name}_forward"] = triton.testing.do_bench(forward, warmup=10, rep=60, return_mode="median")
        row[f"{name}_backward"] = triton.testing.do_bench(backward, warmup=10, rep=60, return_mode="median")
        del forward, backward, grads
    (our_out, our_grads), (their_out, their_grads) = results["ours"], results["mamba"]
    names = ["du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias", "dz", "out_z"]
    from kotomamba.ops.selective_scan import partition

    split = partition(batch, D_INNER[model], 1, seqlen, device)
    row["parts"] = f"{split.forward_parts}/{split.backward_parts}"
    row["max_rel_diff"] = max([relative_error(our_out, their_out)]
                              + [relative_error(a, b) for a, b in zip(our_grads, their_grads)])
    row["worst"] = max(zip([relative_error(a, b) for a, b in zip(our_grads, their_grads)], names))[1]
    row.update({f"floor_{k}": v for k, v in floors(D_INNER[model], batch, seqlen, bandwidth, exp_rate).items()})
    return row


def table(rows: list[dict]) -> str:
    header = ["model", "batch", "seq", "fwd ours", "fwd mamba", "bwd ours", "bwd mamba", "fwd+bwd ours",
              "fwd+bwd mamba", "speed-up", "parts fwd/bwd", "floor mem / exp", "% of floor", "max rel diff"]
    lines = []
    for r in rows:
        ours = r["ours_forward"] + r["ours_backward"]
        theirs = r["mamba_forward"] + r["mamba_backward"]
        floor = r["floor_forward"] + r["floor_backward"]
        lines.append([r["model"], r["batch"], r["seqlen"], f"{r['ours_forward']:.3f}", f"{r['mamba_forward']:.3f}",
                      f"{r['ours_backward']:.3f}", f"{r['mamba_backward']:.3f}", f"{ours:.3f}", f"{theirs:.3f}",
                      f"{theirs / ours:.2f}x", r.get("parts", "1/1"), f"{r['floor_memory_total']:.3f} / {r['floor_exp_total']:.3f}",
                      f"{100 * floor / ours:.0f}%", f"{r['max_rel_diff']:.1e} ({r['worst']})"])
    return markdown_table(header, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(D_INNER), choices=list(D_INNER))
    parser.add_argument("--sweep", action="store_true", help="time tile configurations at one 2.8b shape instead")
    parser.add_argument("--parts-sweep", action="store_true",
                        help="time the sequence split into 1, 2, 4 and 8 parts and the default's choice at PARTS_SHAPES")
    parser.add_argument("--report", type=Path, default=None, help=f"write the section into this file ({BENCHMARKS_MD})")
    parser.add_argument("--shape", default=None, metavar="MODEL,BATCH,SEQ",
                        help=f"the sweep's shape (default {','.join(map(str, SWEEP_SHAPE))})")
    parser.add_argument("--once", action="store_true",
                        help="run our forward and backward once at the sweep's shape and exit (for a profiler: "
                             "ncu -k regex:_selective_scan python benchmarks/scan_kernels.py --once)")
    parser.add_argument("--config", default=None, metavar="JSON",
                        help='ScanConfig fields to use instead of the defaults, e.g. \'{"segment": 128}\'')
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU with mamba-ssm's kernels")

    from kotomamba.kernels import select_kernel_backend

    select_kernel_backend("cuda")
    import selective_scan_cuda

    from kotomamba.ops import selective_scan

    if args.config:
        selective_scan.DEFAULT_CONFIG = selective_scan.ScanConfig(**json.loads(args.config))
    print(f"tile configuration: {selective_scan.DEFAULT_CONFIG}", flush=True)
    ours = selective_scan.SelectiveScanExtension(None)
    device = torch.device("cuda")
    sweep_shape = SWEEP_SHAPE
    if args.shape:
        model, batch, seqlen = args.shape.split(",")
        if model not in D_INNER:
            parser.error(f"--shape: model {model!r} is not one of {', '.join(D_INNER)}")
        sweep_shape = (model, int(batch), int(seqlen))
    if args.once:
        model, batch, seqlen = sweep_shape
        forward, backward, _ = runners(ours, scan_inputs(D_INNER[model], batch, seqlen, device))
        backward()
        torch.cuda.synchronize()
        return 0
    bandwidth, exp_rate = copy_bandwidth(device), exponential_rate(device)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, exponentials {exp_rate / 1e12:.2f} T/s", flush=True)
    rows = []
    if args.parts_sweep:
        print(parts_sweep(ours, selective_scan_cuda))
        return 0
    if args.sweep:
        model, batch, seqlen = sweep_shape
        for config in sweep_configs():
            selective_scan.DEFAULT_CONFIG = config
            try:
                row = measure(model, batch, seqlen, ours, selective_scan_cuda, bandwidth, exp_rate)
            except Exception as error:  # a tile that does not compile or fit is a result of the sweep
                print(f"{config}: {type(error).__name__}: {str(error)[:200]}", flush=True)
                continue
            row["model"] = json.dumps(dataclasses.asdict(config))
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
        if rows:
            best = min(rows, key=lambda r: r["ours_forward"] + r["ours_backward"])
            print(f"fastest configuration: {best['model']}", flush=True)
    else:
        for model in args.models:
            for batch, seqlen in PLAN:
                row = measure(model, batch, seqlen, ours, selective_scan_cuda, bandwidth, exp_rate)
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
                torch.cuda.empty_cache()
    text = table(rows)
    print(text)
    if args.report:
        body = (f"Copy bandwidth measured {bandwidth / 1e12:.2f} TB/s; exponential rate {exp_rate / 1e12:.2f} T/s. "
                "Times in ms.\n\n" + text)
        write_section("scan_kernels_sweep" if args.sweep else "scan_kernels",
                      "Selective-scan kernels: kotomamba's Triton scan vs mamba-ssm's CUDA kernel", body,
                      path=args.report)
    return 0


PARTS_SHAPES = [("2.8b", 16, 2048), ("2.8b", 8, 2048), ("2.8b", 4, 2048), ("2.8b", 1, 2048), ("1.4b", 4, 2048),
                ("130m", 16, 2048), ("130m", 4, 2048), ("130m", 1, 2048), ("2.8b", 1, 16384), ("1.4b", 2, 8192)]


def parts_sweep(ours, theirs) -> str:
    """Forward and backward times with the sequence in 1, 2, 4, 8 parts and as the default splits it."""
    import triton

    from kotomamba.ops import selective_scan

    device = torch.device("cuda")
    header = ["model", "batch", "seq", "parts fwd/bwd", "fwd ours", "bwd ours", "fwd mamba", "bwd mamba", "max rel diff"]
    lines = []
    for model, batch, seqlen in PARTS_SHAPES:
        inputs = scan_inputs(D_INNER[model], batch, seqlen, device)
        forward, backward, expected_out = runners(theirs, inputs)
        expected = backward()
        mamba = [triton.testing.do_bench(f, warmup=5, rep=30) for f in (forward, backward)]
        for parts in (1, 2, 4, 8, None):
            selective_scan.DEFAULT_CONFIG = selective_scan.ScanConfig(forward_parts=parts, backward_parts=parts)
            split = selective_scan.partition(batch, D_INNER[model], 1, seqlen, device)
            forward, backward, out = runners(ours, inputs)
            grads = backward()
            error = max([relative_error(out, expected_out)] + [relative_error(a, b) for a, b in zip(grads, expected)])
            times = [triton.testing.do_bench(f, warmup=5, rep=30) for f in (forward, backward)]
            label = f"{split.forward_parts}/{split.backward_parts}" + (" (default)" if parts is None else "")
            lines.append([model, batch, seqlen, label, *(f"{t:.3f}" for t in times + mamba), f"{error:.1e}"])
            print(" | ".join(map(str, lines[-1])), flush=True)
        selective_scan.DEFAULT_CONFIG = selective_scan.ScanConfig()
        torch.cuda.empty_cache()
    return markdown_table(header, lines)


def sweep_configs():
    from kotomamba.ops.selective_scan import ScanConfig

    # the default first, then channels per program, warps and the backward's segment around it
    yield ScanConfig()
    for fwd_d, fwd_w, bwd_d, bwd_w, segment in ((16, 2, 16, 2, 64), (32, 4, 32, 4, 64), (8, 1, 8, 1, 64),
                                                (16, 1, 32, 2, 64), (8, 1, 16, 2, 128), (8, 1, 16, 2, 32)):
        yield ScanConfig(forward_block_d=fwd_d, forward_warps=fwd_w, backward_block_d=bwd_d, backward_warps=bwd_w,
                         segment=segment)


if __name__ == "__main__":
    raise SystemExit(main())
