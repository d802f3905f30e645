"""Task losses (Eq. 1, 3, 4), the task objects teachers declare, and Eq. 5's feature loss."""
from .feature import feature_loss
from .tasks import (
    DepthTask,
    LossTask,
    NormalTask,
    SegmentationTask,
    Task,
    depth_loss,
    get_task,
    normal_loss,
    segmentation_loss,
)

__all__ = [
    "Task",
    "SegmentationTask",
    "DepthTask",
    "NormalTask",
    "LossTask",
    "get_task",
    "segmentation_loss",
    "depth_loss",
    "normal_loss",
    "feature_loss",
]
