"""The original's recipe, exactly: ``paper.py:<dataset>``.

  python experiments/train_vit.py --config=experiments/configs/paper.py:cifar10
  python experiments/train_vit.py \
      --config=experiments/configs/paper.py:tinyimagenet \
      --config.data.dataset=tinyimagenet:/data/tiny-imagenet-200

``<dataset>`` is ``cifar10``, ``cifar100``, ``svhn`` (TFDS, prepared
beforehand) or ``tinyimagenet`` (``tinyimagenet:<root>`` of the
``tiny-imagenet-200`` folder, resized to 32x32; default root
``./tiny-imagenet-200`` as the original). Every setting is the original's
(docs/design.md): ViT 7 blocks x 384, 8 heads, MLP 1536, patch 4, ReLU,
dropout 0; AdamW lr 1e-3, weight decay 5e-5; 5 warm-up epochs then cosine to
1e-5; 200 epochs of batch 128; crop after grey (128) padding of 4, the
horizontal flip (not on SVHN), AutoAugment (CIFAR-10 policy; SVHN's for
SVHN); the normalisation constants of the ViT-CIFAR code the original is
built on (Tiny ImageNet: its training set's own statistics); stripping
factor 0.05 after every epoch, probing on the TEST set as the original.
``--config.stripping.probe=train_holdout`` probes a held-out 10 % of the
training data instead (the documented alternative, docs/deviations.md).

For an accelerator: the training arrays stay on the device when they fit
(``data.on_device='auto'``) and ``run.steps_per_dispatch`` steps run per
dispatch (docs/accelerators.md).
"""

from synstrip_vit.config import base_config

#: ``<dataset>`` -> (``data.dataset``, ``data.mean``, ``data.std``), the
#: constants in 0..1 units (``()``: the training set's statistics).
DATASETS = {
    "cifar10": ("cifar10", (0.4914, 0.4822, 0.4465),
                (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar100", (0.5071, 0.4867, 0.4408),
                 (0.2675, 0.2565, 0.2761)),
    "svhn": ("svhn_cropped", (0.4377, 0.4438, 0.4728),
             (0.1980, 0.2010, 0.1970)),
    "tinyimagenet": ("tinyimagenet:tiny-imagenet-200", (), ()),
}

#: Optimizer steps per dispatch (one ``lax.scan``): CIFAR-10's 390 steps per
#: epoch in 6 chunks.
STEPS_PER_DISPATCH = 65


def get_config(dataset: str = "cifar10"):
  if dataset not in DATASETS:
    raise ValueError(f"paper.py:{dataset!r}: the dataset must be one of "
                     f"{sorted(DATASETS)}")
  name, mean, std = DATASETS[dataset]
  c = base_config("vit")
  c.data.update(dataset=name, augment=True, crop_padding=4,
                flip=name != "svhn_cropped", autoaugment=True, mean=mean,
                std=std, on_device="auto")
  c.model.update(depth=7, hidden_size=384, num_heads=8, mlp_dim=1536,
                 patch_size=4, activation="relu", dropout=0.0)
  c.optimizer.update(learning_rate=1e-3, min_learning_rate=1e-5,
                     warmup_epochs=5, weight_decay=5e-5)
  c.stripping.update(enabled=True, factor=0.05, frequency=1, probe="test")
  c.run.update(num_epochs=200, batch_size=128,
               steps_per_dispatch=STEPS_PER_DISPATCH)
  return c
