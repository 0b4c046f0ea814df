"""Megatron-LM compatible data layer: indexed datasets, GPT sample order, blending, tokenizers."""
