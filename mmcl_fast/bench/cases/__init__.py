"""The benchmarked losses, one module per family; importing a module registers its `LossBench`es.

clip.py (symmetric InfoNCE, anchor open_clip ClipLoss), siglip.py (sigmoid loss, anchor open_clip SigLipLoss),
latent.py (the latent-modality-structure losses of Jiang et al.: Brownian bridge, uniformity, feature
separation, geometric consistency; anchor: the dense PyTorch formulas, which open_clip does not have).
"""
