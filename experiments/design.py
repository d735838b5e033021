"""The design of the studies, shared by the runner and the report.

``experiments/study.py`` runs these arms, seeds, shapes and corruptions;
``experiments/report.py`` tabulates them.
"""

from __future__ import annotations

#: The seeds of every study.
SEEDS = (0, 1, 2)

#: Dotted field overrides of each arm of ``cifar_vit`` and ``mnist_mlp``.
ARMS = {
    "relu": {"model.activation": "relu", "stripping.enabled": False},
    "relu_strip": {"model.activation": "relu", "stripping.enabled": True},
    "gelu": {"model.activation": "gelu", "stripping.enabled": False},
}

#: The arm of study ``redo`` (ReLU with the ReDo baseline).
REDO_ARM = "relu_redo"

#: ``(depth, width)`` of the MLP ablation, and its arms.
ABLATION_SHAPES = ((1, 128), (2, 128), (4, 128), (8, 128), (4, 32), (4, 512))
ABLATION_ARMS = ("relu", "strip")

#: The corruptions of the robustness evaluation and their severities.
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast")
SEVERITIES = (1, 3, 5)

__all__ = ["ABLATION_ARMS", "ABLATION_SHAPES", "ARMS", "CORRUPTIONS",
           "REDO_ARM", "SEEDS", "SEVERITIES"]
