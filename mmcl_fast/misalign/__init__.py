"""The misalignment study of Cai et al. (2025): what multimodal contrastive learning recovers under selection
and perturbation bias in the text (SPEC §5). `mmcl-fast misalign --help` runs it from the command line."""
from .data import BiasConfig, InvertibleMixer, LatentModel, Sample
from .evaluate import LATENTS, evaluate
from .study import PRESETS, EvalConfig, run_study
from .train import TrainConfig, contrastive_loss, make_encoder, train_encoders

__all__ = ["BiasConfig", "EvalConfig", "InvertibleMixer", "LATENTS", "LatentModel", "PRESETS", "Sample",
           "TrainConfig", "contrastive_loss", "evaluate", "make_encoder", "run_study", "train_encoders"]
