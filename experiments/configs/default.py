"""Offline default: a small ViT on scikit-learn's bundled digits (no download).

8x8 greyscale images, 2x2 patches (a 4x4 grid + class token), 4 blocks of
width 64. Trains in about a minute or two on a laptop CPU:

  python experiments/train_vit.py
"""

from synstrip_vit.config import base_config


def get_config():
  c = base_config()
  c.dataset = "digits"
  c.patch_size = 2
  c.hidden_size = 64
  c.depth = 4
  c.num_heads = 4
  c.mlp_dim = 256
  c.num_epochs = 30
  c.batch_size = 64
  c.eval_batch_size = 128
  c.warmup_epochs = 3
  c.crop_padding = 1
  c.flip = False  # digits are not mirror-symmetric
  return c
