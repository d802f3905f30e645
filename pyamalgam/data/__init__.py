"""Data sets for multi-task dense prediction (segmentation, depth, surface normals).

Every data set yields one sample as a dict of tensors (works with the default ``DataLoader``
collate):

* ``"image"``: float32 (3, H, W) in [0, 1]
* ``"seg"``: int64 (H, W) class ids, ``ignore_index`` (255) where unknown
* ``"depth"``: float32 (H, W) z-depth in metres (along the optical axis), 0 where invalid
* ``"normal"``: float32 (3, H, W) unit normals in camera coordinates (x right, y down,
  z forward), facing the camera, zeros where invalid
* ``"mask"``: bool (H, W), True where depth (and normal, where the data set has normals) are valid

and exposes ``num_classes``, ``class_names``, ``ignore_index``, ``max_depth`` and ``tasks``.

* :class:`SyntheticScenes`: procedurally rendered rooms with exact ground truth (no download);
* :class:`NYUv2`: the pre-processed multi-task NYU Depth v2 ``.npy`` release;
* :class:`Cityscapes`: official layout, depth from disparity, no normals.

Video (clips of T frames, the same keys with a leading time axis, plus flow where known):
:class:`SyntheticClips` (exact flow and visibility), :class:`CityscapesSequences` and
:class:`CamVidSequences` (:mod:`pyamalgam.data.video`; labels only on the annotated frames).

Of pyamalgam, this sub-package imports only the standalone helpers ``_checks`` and ``_io`` (no
compiled extension needed).
The video loaders also use the standalone flow convention, ``pyamalgam._flow``.
"""
from ._common import SAMPLE_KEYS
from .cityscapes import CATEGORY_NAMES, TRAIN_ID_NAMES, Cityscapes
from .nyuv2 import NYUV2_CLASS_NAMES, NYUv2
from .synthetic import SceneSpec, SyntheticScenes
from .synthetic import SyntheticClips
from .video import CAMVID_CLASS_NAMES, CamVidSequences, CityscapesSequences

__all__ = ["CATEGORY_NAMES", "NYUV2_CLASS_NAMES", "SAMPLE_KEYS", "TRAIN_ID_NAMES", "Cityscapes", "NYUv2", "SceneSpec",
           "SyntheticScenes"]
__all__ += ["CAMVID_CLASS_NAMES", "CamVidSequences", "CityscapesSequences", "SyntheticClips"]
