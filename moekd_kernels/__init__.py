"""moekd_kernels: the MoE-KD distillation loss, fused, for large class counts.

    from moekd_kernels import fused_moe_kd_loss, MoEKDLoss, MoEKDStats
"""

from .backends import available_backends, backend_names, describe_auto
from .loss import MoEKDLoss, MoEKDStats, fused_moe_kd_loss
from .teachers import TopKTeacher
from .fused_linear import FusedLinearMoEKDLoss, fused_linear_moe_kd_loss

__all__ = [
    "fused_moe_kd_loss",
    "MoEKDLoss",
    "MoEKDStats",
    "TopKTeacher",
    "fused_linear_moe_kd_loss",
    "FusedLinearMoEKDLoss",
    "available_backends",
    "backend_names",
    "describe_auto",
]
__version__ = "0.1.0"
