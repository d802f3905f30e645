"""Streaming, masked evaluation metrics for the three dense-prediction tasks.

Each metric has ``update(pred, target, mask=None)`` (accumulate one batch), ``compute() ->
dict[str, float]`` (over everything since the last ``reset()``) and ``reset()``. State lives on
the device of the first batch; results are identical however the data set is split into batches.

* :class:`SegmentationMetric`: pixel accuracy, mIoU, mean class accuracy (confusion matrix);
* :class:`DepthMetric`: abs rel, sq rel, RMSE, RMSE log, log10, MAE, δ<1.25^k (pixel-pooled);
* :class:`NormalMetric`: mean / median / RMS angle, fraction within 11.25°, 22.5°, 30°;
* :class:`TemporalConsistency`: TC of video segmentation (thesis 003 ch. 5), mIoU of flow-warped
  neighbouring predictions; ``update(pred_t, pred_tk, flow, mask=None)``.
* :class:`NormalCosineMetric`: mean cosine similarity of normals (seed 002's "SN CS");
* :class:`EdgeMetric`: edge-map abs / squared error, pixel precision / recall / F1;
* :class:`KeypointMetric`: key-point heat-map abs / squared error, peak precision / recall.

This sub-package imports nothing else from pyamalgam (no compiled extension needed)
but the flow convention of ``pyamalgam._flow``.
"""
from .depth import DepthMetric
from .edges import EdgeMetric
from .keypoints import KeypointMetric, heatmap_peaks
from .normals import NormalCosineMetric, NormalMetric, angular_error
from .segmentation import SegmentationMetric
from .temporal import TemporalConsistency

__all__ = ["SegmentationMetric", "DepthMetric", "NormalMetric", "angular_error"]
__all__ += ["TemporalConsistency"]
__all__ += ["EdgeMetric", "KeypointMetric", "NormalCosineMetric", "heatmap_peaks"]
