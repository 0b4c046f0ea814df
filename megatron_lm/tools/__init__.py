"""Command-line tools (Megatron-LM compatible)."""
