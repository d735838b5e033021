"""Offline default: a small ViT on scikit-learn's bundled digits (no download).

8x8 greyscale images, 2x2 patches (a 4x4 grid + class token), 4 blocks of
width 64. Trains in about a minute or two on a laptop CPU:

  python experiments/train_vit.py
  python experiments/train_vit.py --config=experiments/configs/default.py:mlp

``:mlp`` swaps the model for the plain MLP (3 hidden layers of 256).
"""

from synstrip_vit.config import base_config


def get_config(model: str = "vit"):
  c = base_config(model or "vit")
  c.data.dataset = "digits"
  c.data.crop_padding = 1
  c.data.flip = False  # digits are not mirror-symmetric
  if c.model.name == "vit":
    c.model.update(patch_size=2, hidden_size=64, depth=4, num_heads=4,
                   mlp_dim=256)
  c.optimizer.warmup_epochs = 3
  c.run.update(num_epochs=30, batch_size=64, eval_batch_size=128)
  return c
