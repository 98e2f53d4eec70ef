"""The C-MCR reproduction (Wang et al., NeurIPS 2023) on a synthetic three-modality world: two contrastive spaces
trained from scratch, connected by `mmcl_fast.cmcr.CMCRConnector` without paired A–C data, then scored against
chance, a paired-data oracle and the ablations. `python -m studies.cmcr --help` runs it."""
from .spaces import ContrastiveSpace, SpaceConfig, train_space
from .study import ABLATIONS, PRESETS, VARIANTS, StudyConfig, preset_config, run_study
from .world import MODALITIES, ThreeModalityWorld, Triples, WorldConfig

__all__ = ["ABLATIONS", "ContrastiveSpace", "MODALITIES", "PRESETS", "SpaceConfig", "StudyConfig",
           "ThreeModalityWorld", "Triples", "VARIANTS", "WorldConfig", "preset_config", "run_study", "train_space"]
