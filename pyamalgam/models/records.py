"""Model-file nodes of smp teachers and of heterogeneous teachers' connectors (issue 13).

:mod:`.serialize` describes VGG blocks and heads itself; this module adds the two kinds of module
that came later, each as a plain JSON node that the model file holds and :mod:`pyamalgam.deploy`
validates against its schema before anything is built:

* **smp** (:func:`pyamalgam.models.from_smp`): a block (``"smp_block"``), the head
  (``"smp_head"``) or the whole teacher (``"smp"``) is named by the smp model it came from: its
  class (one of :data:`SMP_ARGUMENTS`) and the constructor arguments that smp itself records
  (``model._hub_mixin_config``, smp >= 0.4), restricted to the arguments listed there, plus the
  block's number. Loading builds that smp model with ``encoder_weights=None`` (nothing is
  downloaded; the weights are the file's), cuts it as ``from_smp`` does and keeps the block;
* **connectors** (:mod:`.connected`): ``"block_connector"`` (the student and teacher block
  shapes: the 1x1 convolution's sizes and the resize ratio), ``"connected_coding"`` (a channel
  coding, Fig. 3, then a connector or none) and ``"connected_tail"`` (a teacher's tail and the
  connectors of the side information it reads, in order).

Every node is checked at save time by rebuilding the module from it (on the meta device) and
comparing ``repr`` and tensor shapes, as :mod:`.serialize` does for its own nodes.
"""
from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
from torch import nn

from .connected import BlockConnector, ConnectedCoding, ConnectedTail
from .smp import INSTALL_HINT, SMPBlockNet, SMPHead

__all__ = [
    "SMP_ARGUMENTS",
    "SMPOrigin",
    "build_connector",
    "build_smp_block",
    "build_smp_head",
    "build_smp_model",
    "build_smp_net",
    "describe_connector",
    "describe_smp_block",
    "describe_smp_head",
    "describe_smp_net",
    "smp_cache",
    "smp_spec",
]

_DEEPLAB = ("encoder_name", "encoder_depth", "encoder_output_stride", "decoder_channels", "decoder_atrous_rates",
            "decoder_aspp_separable", "decoder_aspp_dropout", "in_channels", "classes", "upsampling")
#: The smp classes a model file may name, and the constructor arguments it records for each
#: (the load-time schema in :mod:`pyamalgam.deploy.loading` types every one of them).
SMP_ARGUMENTS = {
    "Unet": ("encoder_name", "encoder_depth", "decoder_use_norm", "decoder_channels", "decoder_attention_type",
             "decoder_interpolation", "in_channels", "classes"),
    "FPN": ("encoder_name", "encoder_depth", "decoder_pyramid_channels", "decoder_segmentation_channels",
            "decoder_merge_policy", "decoder_dropout", "decoder_interpolation", "in_channels", "classes", "upsampling"),
    "DeepLabV3Plus": _DEEPLAB,
    "DeepLabV3": _DEEPLAB,
}
#: Arguments that are not recorded: the file rebuilds with these values (from_smp requires the last two).
_FIXED = {"encoder_weights": None, "activation": None, "aux_params": None}


class SMPOrigin(NamedTuple):
    """Where an smp block or head came from: ``spec`` (the smp model's class and arguments, or
    None with ``why`` it cannot be recorded) and ``block`` (its number; None for a head)."""

    spec: dict | None
    why: str | None
    block: int | None


def smp_spec(model: nn.Module) -> tuple:
    """(spec, None) for an smp model a file can name, else (None, why not)."""
    arch = type(model).__name__
    config = getattr(model, "_hub_mixin_config", None)
    if arch not in SMP_ARGUMENTS:
        return None, f"model files name smp {sorted(SMP_ARGUMENTS)} models, not {arch}"
    if not isinstance(config, Mapping):
        return None, ("this segmentation-models-pytorch version does not record the model's constructor arguments "
                      "(model._hub_mixin_config, smp >= 0.4)")
    spec = {"architecture": arch}
    for key, value in config.items():
        if key in _FIXED:
            if key != "encoder_weights" and value is not None:
                return None, f"the smp model was built with {key}={value!r}; from_smp needs {key}=None"
            continue
        if key not in SMP_ARGUMENTS[arch]:
            return None, (f"the smp {arch} was built with {key}={value!r}, an argument model files do not record "
                          f"(they record {list(SMP_ARGUMENTS[arch])})")
        value = list(value) if isinstance(value, tuple) else value
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            return None, f"the smp {arch} argument {key}={value!r} is not a JSON value"
        spec[key] = value
    return spec, None


def build_smp_model(spec: Mapping) -> nn.Module:
    """The smp model of ``spec`` with ``encoder_weights=None``: only the allowed classes, only
    their recorded arguments, only a ResNet/ResNeXt encoder of smp's own registry."""
    try:
        import segmentation_models_pytorch as smp
        from segmentation_models_pytorch.encoders.resnet import ResNetEncoder
    except ImportError as e:
        raise ImportError(f"this model file holds a segmentation-models-pytorch network; loading it needs smp: "
                          f"{INSTALL_HINT}") from e
    arch = spec.get("architecture")
    if arch not in SMP_ARGUMENTS:
        raise ValueError(f"model files name smp {sorted(SMP_ARGUMENTS)} models, not {arch!r}")
    kwargs = {k: v for k, v in spec.items() if k != "architecture"}
    unknown = sorted(set(kwargs) - set(SMP_ARGUMENTS[arch]))
    if unknown:
        raise ValueError(f"smp {arch}: arguments {unknown} are not ones a model file may give")
    entry = smp.encoders.encoders.get(kwargs.get("encoder_name", "resnet34"))
    if entry is None or not (isinstance(entry.get("encoder"), type) and issubclass(entry["encoder"], ResNetEncoder)):
        raise ValueError(f"smp encoder {kwargs.get('encoder_name')!r}: model files hold smp's ResNet/ResNeXt encoders")
    for key in ("decoder_channels", "decoder_atrous_rates"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    return getattr(smp, arch)(**_FIXED, **kwargs)


_CACHE: list = []  # the open smp_cache scopes' dicts (the outermost one is used)


@contextlib.contextmanager
def smp_cache() -> Iterator[None]:
    """Within this scope each smp model is built once per spec and device (a TargetNet's blocks
    come from a few models, each cut into blocks that are then copied); nothing outlives it."""
    _CACHE.append({} if not _CACHE else _CACHE[-1])
    try:
        yield
    finally:
        _CACHE.pop()


def _split_model(spec: Mapping) -> tuple:
    """(model, its blocks) for ``spec``, shared within an :func:`smp_cache` scope (callers copy)."""
    from .smp import split_blocks

    key = (json.dumps(spec, sort_keys=True), str(torch.empty(0).device))
    cache = _CACHE[-1] if _CACHE else {}
    if key not in cache:
        model = build_smp_model(spec)
        cache[key] = model, split_blocks(model)
    return cache[key]


# ---------------------------------------------------------------------------- smp nodes

def _origin(module: nn.Module, where: str) -> SMPOrigin:
    origin = getattr(module, "smp_origin", None)
    if not isinstance(origin, SMPOrigin):
        raise ValueError(f"cannot describe {where}, a {type(module).__name__}: it was not made by from_smp")  # noqa: TRY004
    if origin.spec is None:
        raise ValueError(f"cannot describe {where} (from an smp model): {origin.why}")
    return origin


def describe_smp_block(block: nn.Module, where: str) -> dict:
    origin = _origin(block, where)
    return {"type": "smp_block", "model": origin.spec, "block": origin.block}


def build_smp_block(node: Mapping) -> nn.Module:
    _, blocks = _split_model(node["model"])
    if not 1 <= node["block"] <= len(blocks):
        raise ValueError(f"smp block {node['block']}: the model has blocks 1..{len(blocks)}")
    block = copy.deepcopy(blocks[node["block"] - 1])
    block.smp_origin = SMPOrigin(dict(node["model"]), None, node["block"])
    return block


def describe_smp_head(head: SMPHead) -> dict:
    origin = _origin(head, "the head")
    return {"type": "smp_head", "model": origin.spec, "kind": head.kind,
            "bin_size": None if head.bin_size is None else float(head.bin_size)}


def build_smp_head(node: Mapping) -> SMPHead:
    from ..losses import DepthTask, NormalTask

    model, _ = _split_model(node["model"])
    task = {"depth": DepthTask(), "normals": NormalTask()}.get(node["kind"])  # "raw": no decoding
    channels = int(model.segmentation_head[0].out_channels)
    bins = node["bin_size"]
    if (bins is None) != (node["kind"] != "depth"):
        raise ValueError(f"an smp {node['kind']} head has {'no ' if node['kind'] != 'depth' else ''}bin_size")
    head = SMPHead(copy.deepcopy(model.segmentation_head), task, channels,
                   max_depth=bins * channels if bins else 10.0)
    head.bin_size = None if bins is None else float(bins)  # l itself: it must come back bit for bit
    head.smp_origin = SMPOrigin(dict(node["model"]), None, None)
    return head


def describe_smp_net(net: SMPBlockNet, describe_task) -> dict:
    if net.head is None:
        raise ValueError("cannot describe an smp trunk without its head (as_trunk()); save the teacher")
    return {"type": "smp", "model": _origin(net, "the smp teacher").spec, "task": describe_task(net.task),
            "head": describe_smp_head(net.head)}


def build_smp_net(node: Mapping, build_task) -> SMPBlockNet:
    from .smp import from_smp

    model = build_smp_model(node["model"])
    head = node["head"]
    if head["model"] != node["model"]:
        raise ValueError("the smp teacher's head names another smp model than the teacher")
    max_depth = head["bin_size"] * model.segmentation_head[0].out_channels if head["bin_size"] else 10.0
    net = from_smp(model, build_task(node["task"]), max_depth=max_depth)
    if net.head.kind != head["kind"]:
        raise ValueError(f"an smp {head['kind']} head cannot predict the task {node['task']['type']!r}")
    net.head.bin_size = head["bin_size"]
    return net


# ---------------------------------------------------------------------- connector nodes

def describe_connector(conn: nn.Module, where: str) -> dict:
    if type(conn) is not BlockConnector:
        raise ValueError(f"cannot describe {where}, a {type(conn).__name__}: only BlockConnector")
    return {"type": "block_connector", "student_shape": list(conn.student_shape),
            "teacher_shape": list(conn.teacher_shape)}


def build_connector(node: Mapping) -> BlockConnector:
    return BlockConnector(node["student_shape"], node["teacher_shape"])


def describe_connected_coding(coding: ConnectedCoding, describe_inner) -> dict:
    if len(coding.side):
        raise ValueError("cannot describe a ConnectedCoding that holds side connectors (the Amalgamator's training "
                         "coding); a branch's coding holds none (ConnectedCoding.for_branch)")
    connector = None if type(coding.connector) is nn.Identity else describe_connector(coding.connector, "its connector")
    return {"type": "connected_coding", "coding": describe_inner(coding.coding), "connector": connector}


def build_connected_coding(node: Mapping, build_inner) -> ConnectedCoding:
    connector = nn.Identity() if node["connector"] is None else build_connector(node["connector"])
    return ConnectedCoding(build_inner(node["coding"]), connector)


def describe_connected_tail(tail: ConnectedTail, describe) -> dict:
    side = [{"key": k, "connector": describe_connector(m, f"the side connector of {k!r}")}
            for k, m in zip(tail.side_keys_mapped, tail.side)]
    return {"type": "connected_tail", "inner": describe(tail.inner), "side": side}


def build_connected_tail(node: Mapping, build) -> ConnectedTail:
    keys = [s["key"] for s in node["side"]]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a connected tail maps each side key once, got {keys}")
    return ConnectedTail(build(node["inner"]), {s["key"]: build_connector(s["connector"]) for s in node["side"]})
