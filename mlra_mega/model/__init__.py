"""The GPT model on megatron-core: attention and embedding variants, conversion, export."""
