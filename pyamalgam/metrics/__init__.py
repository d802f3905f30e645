"""Streaming, masked evaluation metrics for the three dense-prediction tasks.

Each metric has ``update(pred, target, mask=None)`` (accumulate one batch), ``compute() ->
dict[str, float]`` (over everything since the last ``reset()``) and ``reset()``. State lives on
the device of the first batch; results are identical however the data set is split into batches.

* :class:`SegmentationMetric`: pixel accuracy, mIoU, mean class accuracy (confusion matrix);
* :class:`DepthMetric`: abs rel, sq rel, RMSE, RMSE log, log10, MAE, δ<1.25^k (pixel-pooled);
* :class:`NormalMetric`: mean / median / RMS angle, fraction within 11.25°, 22.5°, 30°.

This sub-package imports nothing else from pyamalgam (no compiled extension needed).
"""
from .depth import DepthMetric
from .normals import NormalMetric, angular_error
from .segmentation import SegmentationMetric

__all__ = ["SegmentationMetric", "DepthMetric", "NormalMetric", "angular_error"]
