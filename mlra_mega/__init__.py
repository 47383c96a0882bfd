"""mlra_mega: GPT pre-training on megatron-core + DeepSpeed with TEV tracking and MLRA.

Implements "Stable Language Model Pre-training by Reducing Embedding Variability" (EMNLP 2024):
the Token Embedding Variability signal and Multi-head Low-Rank Attention, with the paper's
baselines, on a tensor- and data-parallel base.
"""

__version__ = "0.1.0"
