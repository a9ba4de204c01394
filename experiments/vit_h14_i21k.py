"""ViT-H/14 pre-trained on ImageNet-21k: the L/16 recipe (vit_l16_i21k.py) with the H/14 tower.

A 1280-wide pre-logits layer, remat and scan over layers; on pods shard
parameters and Adam state with --set mesh.fsdp=8 (or more).
"""
import os

from bigvis.config import load_experiment


def get_config(arg=None):
  c = load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), "vit_l16_i21k.py"))
  c.experiment = "vit_h14_i21k"
  c.model.variant = "H/14"
  c.model.representation_size = 1280
  return c
