"""bigvis: pretrain Vision Transformers and CLIP with JAX/Flax on a device mesh."""

__version__ = "0.1.0"
