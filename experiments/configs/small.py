"""A small ViT (4 blocks, hidden 128, 4 heads, MLP 512) that trains in minutes
on a 2-core CPU: the original's 'small' benchmark model, on the 4,000-image
lossless CIFAR-10 subset in the shared folder's ``data/`` (``$SYNSTRIP_SHARED``
or ../shared, see :mod:`synstrip_vit.paths`; override the dataset to use
another one, e.g. ``--config.data.dataset=cifar10`` with TFDS data prepared).
"""

from synstrip_vit.config import base_config
from synstrip_vit.paths import shared_dir


def get_config():
  c = base_config()
  c.data.dataset = f"npz:{shared_dir() / 'data' / 'cifar10_lossless_4k.npz'}"
  c.model.update(hidden_size=128, depth=4, num_heads=4, mlp_dim=512)
  c.optimizer.warmup_epochs = 1
  c.run.num_epochs = 10
  return c
