"""The misalignment study of Cai et al. (2025): what multimodal contrastive learning recovers under selection
and perturbation bias in the text. `python -m studies.misalign --help` runs it from the command line."""
from .data import MIXERS, BiasConfig, InvertibleMixer, LatentModel, Sample
from .evaluate import LATENTS, evaluate, latent_names
from .study import PRESETS, SWEEPS, EvalConfig, run_seed, run_study, sweep_settings
from .train import OBJECTIVES, TrainConfig, contrastive_loss, lpsimclr_loss, make_encoder, train_encoders

__all__ = ["BiasConfig", "EvalConfig", "InvertibleMixer", "LATENTS", "LatentModel", "MIXERS", "OBJECTIVES", "PRESETS",
           "SWEEPS", "Sample", "TrainConfig", "contrastive_loss", "evaluate", "latent_names", "lpsimclr_loss",
           "make_encoder", "run_seed", "run_study", "sweep_settings", "train_encoders"]
