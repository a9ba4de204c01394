"""CLIP ViT-L/14 (Radford et al., 2021): 427.6M parameters, text tower L (768 wide), embed 768.

The recipe of experiments/clip_vitb16.py (batch 32,768, AdamW(0.9, 0.98, eps
1e-6), wd 0.2, 2,000 warmup steps, cosine, bf16) with the paper's L/14
learning rate 4e-4; remat and scan over layers keep activations and compile
time in check. Same `:arg` keys as clip_vitb16 (tokenizer=, imagenet=,
classnames=, retrieval=); on pods add --set mesh.fsdp=8 or so.
"""
import os

from bigvis.config import load_experiment_module


def _paper():
  """experiments/clip_vitb16.py, which holds the shared recipe."""
  return load_experiment_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_vitb16.py"))


def get_config(arg=None):
  return _paper().clip_paper_config("clip_vitl14", image="L/14", text="L", embed_dim=768, lr=4e-4, arg=arg,
                                    remat_policy="dots_no_batch", scan=True)
