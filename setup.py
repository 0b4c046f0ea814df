"""Install kotomamba and build megatron_lm's C++ sample-index helper with pybind11."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

from pathlib import Path

version = {}
exec((Path(__file__).parent / "kotomamba" / "version.py").read_text(), version)

setup(
    name="kotomamba",
    version=version["__version__"],
    description="Pretraining and continual pretraining of Mamba state-space language models with PyTorch FSDP",
    packages=find_packages(include=["kotomamba", "kotomamba.*", "megatron_lm", "megatron_lm.*"]),
    python_requires=">=3.10",
    install_requires=["numpy", "torch>=2.6", "pyyaml"],
    ext_modules=[
        Pybind11Extension(
            "megatron_lm._helpers",
            ["megatron_lm/helpers.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ],
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
