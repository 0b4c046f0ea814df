"""kotomamba: pretraining of mamba-ssm language models with PyTorch FSDP."""
from kotomamba.version import __version__

__all__ = ["__version__"]
