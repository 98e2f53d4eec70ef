"""Deep feature-separation loss (docs/design.md#feature-separation, Jiang et al. CVPR 2023).

Extra heads give "independent" features z^i_V, z^i_T that should carry what the shared (contrastive) features
z_V, z_T do not. With z^{i,a} the independent features of an augmented view:

    L_Ortho = (1/N) sum_j (<z_Vj, z^i_Vj>^2 + <z_Tj, z^i_Tj>^2)                    O(N*D), plain autograd
    L^i_Con = CE(z^i_V z^{i,a}_V^T / tau, diag) + CE(z^i_T z^{i,a}_T^T / tau, diag)   one-sided InfoNCE, fused
    L^i_Uni = L_uni(z^i_V; t) + L_uni(z^i_T; t)                                      `uniformity_loss`, fused
    L_Sep   = L_Ortho + L^i_Con + L^i_Uni

The two N^2 terms run on the streamed-LSE primitive (`infonce`, `uniformity_loss`): O(N*D) memory in all.

Precision: z^i_V and z^i_T feed three terms each. bfloat16/float16 features are widened to float32 once, up front
(O(N*D)), so that each feature's three gradient parts add up in float32 and reach the input dtype in one
rounding; 16-bit parts rounded and summed separately would lose about a percent where they cancel.
"""
from __future__ import annotations

from torch import Tensor, nn

from .._autocast import autocast_off
from .._numerics import accumulation_dtype
from .._stats import rowdot
from .._validate import check_same_shape
from .infonce import infonce
from .uniformity import _check_positive, uniformity_loss


@autocast_off
def feature_separation_loss(image_features: Tensor, text_features: Tensor, image_indep: Tensor,
                            text_indep: Tensor, image_indep_aug: Tensor, text_indep_aug: Tensor,
                            temperature=0.07, t=2.0, *, backend: str = "auto") -> Tensor:
    """L_Sep = L_Ortho + L^i_Con + L^i_Uni of Jiang et al. (CVPR 2023); see the module docstring for the terms.

    Args:
        image_features: (N, D_V) shared image features z_V.
        text_features: (N, D_T) shared text features z_T.
        image_indep: (N, D_V) independent image features z^i_V.
        text_indep: (N, D_T) independent text features z^i_T.
        image_indep_aug: the augmented view's independent image features, (N, D_V).
        text_indep_aug: the augmented view's independent text features, (N, D_T).
        temperature: tau of the intra-modal InfoNCE (default 0.07): positive float or 0-d tensor (may need grad).
        t: temperature of the uniformity terms (default 2; the mean runs over all N^2 pairs, see
            `uniformity_loss`).
        backend: primitive backend: "auto" | "reference" | "torch" | "cpu" | "triton".

    Returns:
        0-d tensor, float32 (float64 for float64 features).
    """
    check_same_shape(image_features, "image_features", image_indep, "image_indep")
    check_same_shape(text_features, "text_features", text_indep, "text_indep")
    check_same_shape(image_indep, "image_indep", image_indep_aug, "image_indep_aug")
    check_same_shape(text_indep, "text_indep", text_indep_aug, "text_indep_aug")
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError("image_features and text_features must have the same batch size (paired rows), got "
                         f"{image_features.shape[0]} and {text_features.shape[0]}")
    temperature = _check_positive(temperature, "temperature", image_features)
    t = _check_positive(t, "t", image_features)
    acc = accumulation_dtype(image_features.dtype)
    image_features, text_features, image_indep, text_indep, image_indep_aug, text_indep_aug = (
        z.to(acc) for z in (image_features, text_features, image_indep, text_indep, image_indep_aug, text_indep_aug))
    ortho = (rowdot(image_features, image_indep, acc).square().mean()
             + rowdot(text_features, text_indep, acc).square().mean())
    scale = 1.0 / temperature
    contrast = (infonce(image_indep, image_indep_aug, scale, symmetric=False, backend=backend)
                + infonce(text_indep, text_indep_aug, scale, symmetric=False, backend=backend))
    uniform = uniformity_loss(image_indep, t, backend=backend) + uniformity_loss(text_indep, t, backend=backend)
    return ortho + contrast + uniform


class FeatureSeparationLoss(nn.Module):
    """Module form of `feature_separation_loss`;
    ``forward(image, text, image_indep, text_indep, image_indep_aug, text_indep_aug)``."""

    def __init__(self, temperature=0.07, t=2.0, backend: str = "auto"):
        super().__init__()
        self.temperature = temperature
        self.t = t
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, image_indep: Tensor, text_indep: Tensor,
                image_indep_aug: Tensor, text_indep_aug: Tensor) -> Tensor:
        return feature_separation_loss(image_features, text_features, image_indep, text_indep, image_indep_aug,
                                       text_indep_aug, self.temperature, self.t, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, t={self.t}, backend={self.backend!r}"
