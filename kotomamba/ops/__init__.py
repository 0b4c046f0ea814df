"""kotomamba's own GPU kernels (Triton), usable on their own and routed under mamba-ssm by kotomamba.kernels."""
