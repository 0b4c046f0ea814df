"""The exceptions that mean "the user's input is wrong", each raised with a message naming the
file, flag or value. Entry points print these as one line instead of a traceback; anything else is
a bug and keeps its traceback."""
from __future__ import annotations

from kotomamba.arguments import ArgumentError
from kotomamba.checkpoint import TrainingCheckpointError
from kotomamba.convert import ExportError
from kotomamba.distributed import LaunchError
from kotomamba.flops import FlopsConfigError
from kotomamba.kernels import KernelRoutingError, KernelsUnavailableError
from kotomamba.model import CheckpointError, ModelConfigError
from kotomamba.optim import OptimizerConfigError
from kotomamba.precision import PrecisionConfigError
from kotomamba.run_lock import RunLockError
from kotomamba.sinks import MetricsSinkError
from kotomamba.train import TrainingError
from megatron_lm.data_builder import DataConfigError
from megatron_lm.gpt_dataset import DatasetBuildError
from megatron_lm.helpers import HelpersNotBuiltError
from megatron_lm.indexed_dataset import IndexedDatasetError
from megatron_lm.tokenizer import TokenizerError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ArgumentError, ExportError, LaunchError, FlopsConfigError, KernelRoutingError, KernelsUnavailableError, CheckpointError,
    MetricsSinkError, ModelConfigError, OptimizerConfigError, PrecisionConfigError, TrainingError, DataConfigError,
    DatasetBuildError, HelpersNotBuiltError, IndexedDatasetError, TokenizerError, TrainingCheckpointError,
    RunLockError,
)
