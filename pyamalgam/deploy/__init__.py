"""Deployment (issue 13): a network as one self-describing file, export, and batch prediction.

- :func:`load` (``pyamalgam.load``) / :func:`save_model` (``TargetNet.save``): safetensors weights
  plus the architecture as JSON, no pickle (loading.py; the writer is
  :mod:`pyamalgam.models.serialize`, so that ``TargetNet.save`` can reach it);
- :func:`export_model`: ``torch.export`` to ONNX or ``.pt2``, the fused operators decomposed into
  their reference formulas (export.py);
- :func:`predict`: images in, colour-coded segmentation / 16-bit depth / normal PNGs out (predict.py);
- the ``pyamalgam export`` and ``pyamalgam predict`` commands (export_command.py, predict_command.py).

See docs/deploy.md.
"""
import importlib

__all__ = ["LoadedModel", "export_model", "load", "load_record", "predict", "save_model", "save_target_net"]

# Everything loads on first use: the CLI imports the two command modules to build its parser, and
# that must not load torch, the compiled operators or PIL.
_LAZY = {"load": ".loading", "load_record": ".loading", "LoadedModel": ".loading", "save_model": "..models.serialize",
         "export_model": ".export", "predict": ".predict"}


def save_target_net(net, path, **kwargs):
    """``net.save(path)`` for a TargetNet (or a teacher): see :func:`pyamalgam.models.serialize.save_model`."""
    from ..models.serialize import save_model

    return save_model(net, path, **kwargs)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
