"""Scripts of the ViT application: the trainer, the study, its report."""
