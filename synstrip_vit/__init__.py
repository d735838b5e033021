"""synstrip_vit: the ViT training application of synstrip_jax.

Data and input pipeline, models, train state and steps, the training loop,
checkpointing (orbax), metric writers, multi-host start-up and configs. Its
entry point is ``experiments/train_vit.py``; its dependencies come with the
``[train]`` extra (``pip install -e ".[train]"``). The library it uses,
:mod:`synstrip_jax`, depends on jax, numpy, optax and flax only.
"""
