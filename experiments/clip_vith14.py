"""CLIP ViT-H/14 (OpenCLIP's scaling of Radford et al., 2021): 986.1M parameters, text tower H, embed 1024.

The recipe of experiments/clip_vitb16.py (batch 32,768, AdamW(0.9, 0.98, eps
1e-6), wd 0.2, 2,000 warmup steps, cosine, bf16) with the paper's
learning rate of L/14 (4e-4); the 1024-wide, 24-layer text tower follows OpenCLIP's
ViT-H-14. Remat and scan over layers are on; float32 parameters and Adam moments are
~12 GB, so on pods shard it: --set mesh.fsdp=16 or so. Same `:arg` keys as
clip_vitb16 (tokenizer=, imagenet=, classnames=, retrieval=).
"""
import os

from bigvis.config import load_experiment_module


def _paper():
  """experiments/clip_vitb16.py, which holds the shared recipe."""
  return load_experiment_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_vitb16.py"))


def get_config(arg=None):
  return _paper().clip_paper_config("clip_vith14", image="H/14", text="H", embed_dim=1024, lr=4e-4, arg=arg,
                                    remat_policy="dots_no_batch", scan=True)
