"""The original's ViT set-up on TFDS cifar10 (see ``original_config``)."""

from synstrip_vit.config import original_config


def get_config():
  return original_config("cifar10")
