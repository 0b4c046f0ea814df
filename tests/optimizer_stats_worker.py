"""Started by tests/test_optimizer_stats.py under torchrun (2 processes) to check that optimizer
statistics reduced over FSDP shards equal those of the whole tensors:

    torchrun --nproc-per-node 2 tests/optimizer_stats_worker.py SPEC.json RESULTS.json

SPEC.json is {"model_config": PATH, "vocab_size": N, "training": {name: [pretrain.py arguments]}}. For
several sharding strategies and precisions, a model with odd dimensions (so FSDP pads its shards) takes
two AdamW steps; then `OptimizerStats` is computed and compared with the same figures from
`full_tensor()` gathers. The training runs go through run_training (their metric sinks are the
record). Rank 0 writes RESULTS.json: {"sharded": {case: {"stats", "reference", "padded",
"replicated"}}, "training": {name: run record}}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kotomamba.distributed import DistributedContext, init_distributed, shutdown_distributed  # noqa: E402
from reference_training import grouped_stats  # noqa: E402
from training_worker import run_configurations  # noqa: E402

CASES = {  # name: (--sharding-strategy, precision preset)
    "full_shard_bf16": ("FULL_SHARD", "bf16"),  # fp32 A_log/D/dt_bias are FSDP-ignored plain replicas
    "no_shard_fp32": ("NO_SHARD", "fp32"),  # every shard replicated over a mesh dimension
}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def sharded_case(strategy: str, precision: str, model_config: str, vocab_size: int, ctx: DistributedContext) -> dict:
    from kotomamba.model import build_model, load_model_config
    from kotomamba.optim import build_optimizer, marked_no_weight_decay_names
    from kotomamba.optimizer_stats import OptimizerStats
    from kotomamba.parallel import parallelize
    from kotomamba.precision import autocast_context, resolve_precision

    policy = resolve_precision(precision, device_type=ctx.device.type)
    model = build_model(load_model_config(model_config, vocab_size), seed=0)
    no_decay = marked_no_weight_decay_names(model)
    sharded = parallelize(model, ctx, strategy=strategy, param_dtype=policy.param_dtype,
                          reduce_dtype=policy.reduce_dtype)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, no_decay_names=no_decay)
    generator = torch.Generator().manual_seed(100 + ctx.rank)  # each rank its own data
    for step in range(2):
        tokens = torch.randint(0, vocab_size, (2, 16), generator=generator)
        with autocast_context(policy, ctx.device.type):
            logits = model(tokens).logits
        F.cross_entropy(logits.float()[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).backward()
        sharded.sync_replicated_gradients()
        optimizer.step()
        if step == 0:
            optimizer.zero_grad()
    stats = OptimizerStats(model, optimizer, ctx.device).compute()
    whole = {}
    for name, parameter in model.named_parameters():  # full_tensor() is a collective: same order everywhere
        state = optimizer.state[parameter]
        exp_avg_sq = _whole(state["exp_avg_sq"])
        whole[name] = {"weight": _whole(parameter), "grad": _whole(parameter.grad), "exp_avg": _whole(state["exp_avg"]),
                       "exp_avg_sq": exp_avg_sq, "exp_avg_sq_sqrt": exp_avg_sq.sqrt()}
    padded = [name for name, p in model.named_parameters()
              if isinstance(p, DTensor) and any(placement.is_shard() for placement in p.placements)
              and p.shape[0] % p.device_mesh.size(-1)]
    return {"stats": stats, "reference": grouped_stats(whole), "padded": padded,
            "replicated": len(sharded.replicated_parameters)}


def main() -> None:
    spec_path, results_path = sys.argv[1:3]
    spec = json.loads(Path(spec_path).read_text())
    ctx = init_distributed()
    completed = False
    try:
        from kotomamba.kernels import select_kernel_backend

        select_kernel_backend(ctx.device)
        results = {"sharded": {
            name: sharded_case(strategy, precision, spec["model_config"], spec["vocab_size"], ctx)
            for name, (strategy, precision) in CASES.items()
        }}
        results["training"] = run_configurations(spec["training"], ctx)
        if ctx.rank == 0:
            Path(results_path).write_text(json.dumps(results))
        completed = True
    finally:
        shutdown_distributed(completed)


if __name__ == "__main__":
    main()
