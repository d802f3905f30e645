"""``pyamalgam.load``: a network back from its one file, which is untrusted (issue 13).

Reads what :func:`pyamalgam.models.serialize.save_model` (and ``TargetNet.save``) writes, and the
two-file teacher checkpoints of ``pyamalgam train-teacher`` (dispatched to
:func:`pyamalgam.teachers.load_teacher`). Nothing is unpickled, and before anything acts on the
file it is checked, each problem a :class:`~pyamalgam.engine.CorruptFileError` naming the file:

1. the safetensors header: length within the file (a torn or empty file), at most
   ``MAX_HEADER_BYTES``, JSON no deeper than ``MAX_JSON_DEPTH``;
2. the record: format and version, then the architecture against a schema (every node type,
   field and range; unknown fields refused), so a crafted record cannot reach a constructor with
   a string where a channel count belongs;
3. the network it describes is built on the meta device (no memory), run once there on a probe
   image (a trunk that misses a block or a branch point outside the network fails here), and its
   tensor names and shapes are compared with the file's header, all before any weight is read;
4. the weights' sha256 against the record's digest (safetensors has no checksum: a flipped bit
   would load as another network), and the rebuilt network's record against the stored one.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..amalgamation.branch import Branch, TargetNet
from ..engine import CorruptFileError, check_tensors, expected_state
from ..engine.checkpoint import MAX_HEADER_BYTES
from ..engine.schema import (
    ANY,
    Bool,
    Int,
    ListOf,
    MapOf,
    Nullable,
    Num,
    Record,
    SchemaError,
    Str,
    loads_limited,
    validate,
)
from ..models import serialize as ser
from ..models.records import SMP_ARGUMENTS
from ..teachers import load_teacher

__all__ = ["LoadedModel", "load", "load_record", "read_header"]

MAX_BLOCKS = 128     # N of any network a file may describe (VGG16 SegNet: 10)
MAX_CHANNELS = 1 << 16


class LoadedModel(NamedTuple):
    """A loaded network (eval mode) and the JSON record of its file (``kind``, ``architecture``,
    ``resolution`` if saved with one, ``extra``); a teacher checkpoint's record is its sidecar."""

    net: nn.Module
    record: dict


def load(path, device=None) -> nn.Module:
    """The network saved at ``path`` (a model file or a teacher checkpoint), in eval mode, on
    ``device`` (default CPU). A corrupted, torn or foreign file is a CorruptFileError (a
    ValueError) naming it; a missing one a FileNotFoundError."""
    return load_record(path, device).net


def load_record(path, device=None) -> LoadedModel:
    """:func:`load` and the file's record."""
    path = Path(path)
    if path.suffix == ".json" or (not path.is_file() and path.with_suffix(".json").is_file()):
        return _teacher(path, device)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}; write one with TargetNet.save(path) or "
                                f"pyamalgam.deploy.save_model(net, path)")
    meta = read_header(path)
    if meta.get("format") == "pyamalgam-teacher":
        return _teacher(path, device)
    record = _record(meta, path)
    arch = record["architecture"]
    expected = _expected(arch, path)
    dtype = ser.dtype_of(record["dtype"])
    tensors = _tensors(path, expected, dtype)
    if ser.state_digest(tensors) != record["digest"]:
        raise CorruptFileError(f"{path}: its weights do not match their sha256 digest: the file is corrupted", path)
    net = _build(arch).to(dtype)
    net.load_state_dict(tensors, strict=True)
    if ser.describe(net) != arch:  # the record must describe what it built, field for field
        raise CorruptFileError(f"{path}: its architecture record does not describe the network it builds", path)
    return LoadedModel(net.to(device or "cpu").eval(), record)


def read_header(path) -> dict:
    """The ``__metadata__`` of the safetensors file ``path`` (the raw strings), checked for size,
    depth and form first; a CorruptFileError naming the file otherwise."""
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        total = f.seek(0, 2)
        size = int.from_bytes(size_bytes, "little") if len(size_bytes) == 8 else -1
        if size < 2 or 8 + size > total:
            raise CorruptFileError(f"{path} is not a model file: {total} bytes, a torn, empty or foreign file", path)
        if size > MAX_HEADER_BYTES:
            raise CorruptFileError(f"{path}: a safetensors header of {size} bytes, more than the {MAX_HEADER_BYTES} "
                                   f"pyamalgam reads", path)
        f.seek(8)
        header = loads_limited(f.read(size), f"{path} is not a safetensors file: its header", path,
                               max_bytes=MAX_HEADER_BYTES)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptFileError(f"{path} is a safetensors file without pyamalgam metadata: not a model file", path)
    if ser.META_KEY in meta:
        record = loads_limited(meta[ser.META_KEY], f"{path}: its model record", path)
        if not isinstance(record, dict):
            raise CorruptFileError(f"{path}: its model record must be a JSON object", path)
        return record
    if meta.get("format") == "pyamalgam-teacher":
        return {"format": "pyamalgam-teacher"}
    if "pyamalgam" in meta:
        raise CorruptFileError(f"{path} is a training checkpoint (resume state), not a model file; load the "
                               f"network it trained and save it with TargetNet.save", path)
    raise CorruptFileError(f"{path} is a safetensors file but not a pyamalgam model file", path)


def _teacher(path: Path, device) -> LoadedModel:
    net, record = load_teacher(path, device=device)
    return LoadedModel(net, {"kind": "teacher", "format": "pyamalgam-teacher", "config": dict(record.config)})


# -------------------------------------------------------------------------------- the record

def _record(meta: dict, path: Path) -> dict:
    if meta.get("format") != ser.FORMAT:
        raise CorruptFileError(f"{path}: its record is not a {ser.FORMAT} record", path)
    if meta.get("version") != ser.FORMAT_VERSION:
        raise CorruptFileError(f"{path} is a {ser.FORMAT} file of version {meta.get('version')!r}; this pyamalgam "
                               f"reads version {ser.FORMAT_VERSION}", path)
    spec = Record({"format": Str(), "version": Int(), "kind": Str(("teacher", "target_net")),
                   "dtype": Str(tuple(ser.DTYPES)), "architecture": _node, "digest": Str(max_len=100)},
                  {"resolution": _PAIR, "extra": MapOf(Str(), ANY)}, extra=None)
    record = validate(meta, spec, path)
    kind = "target_net" if record["architecture"]["type"] == "target_net" else "teacher"
    if record["kind"] != kind:
        raise CorruptFileError(f"{path}: kind {record['kind']!r} but its architecture is a {kind}", path)
    return record


_CH = Int(1, MAX_CHANNELS)
_BLOCK_NO = Int(1, MAX_BLOCKS)
_NAME = Str(max_len=200)
_DECODER = Str(("unpool", "concat"))
_SHAPE = ListOf(Int(1, 1 << 16), max_len=3)


def _fraction(value, where):
    Num(finite=True)(value, where)
    if not 0 <= value <= 1:
        raise SchemaError(f"{where} must lie in [0, 1], got {value!r}")
    return value


_SMP_ARG = {  # every argument records.SMP_ARGUMENTS lets a file give, typed (per class where they differ)
    "encoder_name": Str(max_len=64), "encoder_depth": Int(1, 5), "in_channels": _CH, "classes": Int(1, 100_000),
    "decoder_use_norm": lambda v, w: v if isinstance(v, bool) else Str(
        ("batchnorm", "identity", "layernorm", "instancenorm", "inplace"))(v, w),
    "decoder_attention_type": Nullable(Str(("scse",))),
    "decoder_interpolation": Str(("nearest", "bilinear", "bicubic", "area", "nearest-exact")),
    "decoder_pyramid_channels": _CH, "decoder_segmentation_channels": _CH, "decoder_merge_policy": Str(("add", "cat")),
    "decoder_dropout": _fraction, "decoder_aspp_dropout": _fraction, "decoder_aspp_separable": Bool,
    "upsampling": Nullable(Int(1, 64)), "encoder_output_stride": Int(8, 16),
    "decoder_atrous_rates": ListOf(Int(1, 1024), max_len=8),
}
_SMP_CHANNELS = {"Unet": ListOf(_CH, max_len=5), "DeepLabV3Plus": _CH, "DeepLabV3": _CH}


def _smp_model(value, where):
    """An smp model record: an allowed class and only the arguments model files record for it."""
    arch = value.get("architecture") if isinstance(value, dict) else None
    if arch not in SMP_ARGUMENTS:
        raise SchemaError(f"{where} must name an smp model of {sorted(SMP_ARGUMENTS)}, got {_short(arch)}")
    fields = {k: _SMP_CHANNELS[arch] if k == "decoder_channels" else _SMP_ARG[k] for k in SMP_ARGUMENTS[arch]}
    return Record({"architecture": Str()}, fields, extra=None)(value, where)


def _short(value) -> str:
    return repr(value)[:60]


_TASK = Record({"type": Str(("segmentation", "depth", "normal", "edges", "keypoints")), "name": _NAME}, extra=None)
_SPECS = {
    "vgg_encoder": {"level": _BLOCK_NO, "in_channels": _CH, "out_channels": _CH, "convs": Int(1, 64), "decoder": _DECODER},
    "vgg_decoder": {"level": _BLOCK_NO, "channels": _CH, "out_channels": _CH, "convs": Int(1, 64), "decoder": _DECODER,
                    "deepest": Bool},
    "segmentation": {"in_channels": _CH, "num_classes": Int(2, 100_000)},
    "depth": {"in_channels": _CH, "num_bins": Int(2, 100_000), "bin_size": Num(positive=True)},
    "normal": {"in_channels": _CH},
    "edges": {"in_channels": _CH},
    "keypoints": {"in_channels": _CH},
    "channel_coding": {"channels": _CH, "hidden": _CH},
    "smp_block": {"model": _smp_model, "block": _BLOCK_NO},
    "smp_head": {"model": _smp_model, "kind": Str(("raw", "depth", "normals")), "bin_size": Nullable(Num(positive=True))},
    "block_connector": {"student_shape": _SHAPE, "teacher_shape": _SHAPE},
    "connected_coding": {"coding": lambda v, w: _typed(("channel_coding",))(v, w),
                         "connector": Nullable(lambda v, w: _typed(("block_connector",))(v, w))},
}


def _typed(kinds):
    """A spec for a node whose ``type`` is one of ``kinds`` (then its own fields, nothing else)."""
    def spec(value, where):
        if not isinstance(value, dict) or value.get("type") not in kinds:
            raise SchemaError(f"{where} must be an object with type one of {list(kinds)}, got "
                              f"{value.get('type') if isinstance(value, dict) else type(value).__name__!r}")
        return Record({"type": Str(), **_SPECS[value["type"]]}, extra=None)(value, where)
    return spec


_BLOCK = _typed(("vgg_encoder", "vgg_decoder", "smp_block"))
_HEAD = _typed(("segmentation", "depth", "normal", "edges", "keypoints", "smp_head"))
_CODING = _typed(("channel_coding", "connected_coding"))
_SIDE_CONNECTOR = Record({"key": _NAME, "connector": _typed(("block_connector",))}, extra=None)
_BLOCKS = MapOf(Str(max_len=4), _BLOCK, max_len=MAX_BLOCKS)
_NETWORK = {
    "vgg": {"task": _TASK, "depth": Int(1, 16), "decoder": _DECODER, "channels": ListOf(_CH, max_len=16),
            "convs": ListOf(Int(1, 64), max_len=16), "in_chans": _CH, "head": _HEAD},
    "sequential": {"num_blocks": _BLOCK_NO, "size_divisor": Int(1, 1 << 16), "in_chans": _CH, "task": Nullable(_TASK),
                   "blocks": _BLOCKS, "head": Nullable(_HEAD)},
    "target_net": {"num_blocks": _BLOCK_NO, "size_divisor": Int(1, 1 << 16), "in_chans": _CH, "trunk": _BLOCKS,
                   "branches": MapOf(_NAME, lambda v, w: _BRANCH(v, w), max_len=64),
                   "outputs": MapOf(_NAME, MapOf(_NAME, _TASK, max_len=64), max_len=64),
                   "task_weights": MapOf(_NAME, Num(finite=True))},
    "smp": {"model": _smp_model, "task": _TASK, "head": _typed(("smp_head",))},
    "connected_tail": {"inner": lambda v, w: _node(v, w), "side": ListOf(_SIDE_CONNECTOR, max_len=64)},
}
_BRANCH = Record({"point": Int(0, MAX_BLOCKS), "coding": Nullable(_CODING), "tail": lambda v, w: _node(v, w)}, extra=None)


def _node(value, where):
    """A network node: ``vgg``, ``sequential`` or ``target_net`` (recursively), block keys numbers."""
    if not isinstance(value, dict) or value.get("type") not in _NETWORK:
        raise SchemaError(f"{where} must be a network node of type one of {list(_NETWORK)}")
    Record({"type": Str(), **_NETWORK[value["type"]]}, extra=None)(value, where)
    for field in ("blocks", "trunk"):
        for k in value.get(field, {}):
            if not k.isdigit() or not 1 <= int(k) <= value["num_blocks"] or str(int(k)) != k:
                raise SchemaError(f"{where}[{field!r}] has a block number {k!r} outside 1..{value['num_blocks']}")
    return value


# ------------------------------------------------------------------------------ the network

def _build(node) -> nn.Module:
    with ser.records.smp_cache():  # one smp model per spec, cut into the blocks that are copied
        return _build_node(node)


def _build_node(node) -> nn.Module:
    if node["type"] != "target_net":
        return ser.build_network(node, _build)
    trunk = {int(k): ser.build_block(b) for k, b in node["trunk"].items()}
    branches = {}
    for key, br in node["branches"].items():
        tail = _build(br["tail"])
        if tail.num_blocks != node["num_blocks"]:
            raise ValueError(f"branch {key!r} has {tail.num_blocks} blocks, the TargetNet {node['num_blocks']}")
        coding = None if br["coding"] is None else ser.build_coding(br["coding"])
        branches[key] = Branch(br["point"], coding, tail)
    outputs = {key: {name: ser.build_task(t) for name, t in out.items()} for key, out in node["outputs"].items()}
    if set(outputs) != set(branches):
        raise ValueError(f"outputs are given for {sorted(outputs)}, branches are {sorted(branches)}")
    return TargetNet(trunk, branches, outputs, num_blocks=node["num_blocks"], size_divisor=node["size_divisor"],
                     in_chans=node["in_chans"], task_weights=node["task_weights"])


def _expected(arch, path) -> dict:
    """The state dict the architecture implies, from a meta build that also ran once on a probe."""
    def factory():
        net = _build(arch).eval()
        d = 2 * net.size_divisor  # 2x: at 1x1 the deepest features are a single value (GroupNorm refuses it)
        with torch.no_grad():
            net(torch.empty(1, net.in_chans, d, d))  # meta: shapes only
        return net

    try:
        return expected_state(factory)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, NotImplementedError, AttributeError,
            AssertionError) as e:  # AssertionError: smp checks its arguments with assert
        raise CorruptFileError(f"{path}: its architecture builds no network that runs: {type(e).__name__}: {e}",
                               path) from None


def _tensors(path, expected, dtype) -> dict:
    from safetensors import SafetensorError, safe_open

    what = f"{path} (the weights of its architecture record)"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys())
            check_tensors(expected, {k: (tuple(f.get_slice(k).get_shape()),) for k in names}, what, path)
            tensors = {k: f.get_tensor(k) for k in names}
    except (OSError, SafetensorError) as e:
        raise CorruptFileError(f"{path} is not a readable safetensors file: {e}", path) from None
    for k, t in tensors.items():
        want = dtype if expected[k].is_floating_point() else expected[k].dtype
        if t.dtype != want:
            raise CorruptFileError(f"{what}: {k!r} is {t.dtype}, the record says {want}", path)
    return tensors


def _pair(value, where):
    ListOf(Int(1, 1 << 16), max_len=2)(value, where)
    if len(value) != 2:
        raise SchemaError(f"{where} must be [H, W], got {value!r}")
    return value


_PAIR = _pair
