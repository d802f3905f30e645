"""A network as one self-describing file: safetensors weights + the architecture as JSON (issue 13).

``save_model(net, path)`` writes the network's tensors and, in the safetensors header, a JSON
record of what they belong to, so :func:`pyamalgam.deploy.load` rebuilds the network from the file
alone, without pickle: loading an untrusted file runs no code of its own. The architecture is a
tree of plain nodes, each read off the modules themselves:

* a **teacher** of :mod:`pyamalgam.models` (``"vgg"``: the :class:`VGGEncoderDecoder` arguments,
  its channels already scaled by ``width``), or a cut-off tail of one (``"sequential"``: the blocks
  it holds, by number, and its head);
* a **TargetNet** (``"target_net"``, paper 001 Step 4): its trunk blocks 1..P, and per teacher the
  branch point p, the channel coding's sizes and the teacher's tail p+1..N (itself a node, so the
  branch of a TargetNet-2 teaching TargetNet-3 by Eq. 9 nests a ``"target_net"``).

Blocks are :class:`EncoderBlock` / :class:`DecoderBlock` or the blocks of
:func:`~pyamalgam.models.from_smp`, heads the five of :mod:`.heads` or :class:`SMPHead`, codings
:class:`~pyamalgam.nn.ChannelCoding` or a heterogeneous teacher's :class:`ConnectedCoding`, and a
branch's tail may be a :class:`ConnectedTail` (the smp and connector nodes are in :mod:`.records`).
Every block, head and coding is rebuilt from its node on the meta device while it is described and
must come out with the same ``repr`` (layer types, sizes, BatchNorm settings), so a module the node
cannot reproduce is refused at save time, never a file that does not load. Anything else (a custom
block or head, a loss callable as task) is refused with the module's name.

This is the writing half (the models floor cannot read untrusted metadata: that needs the engine's
schemas); :mod:`pyamalgam.deploy` reads, checks and rebuilds. TargetNet nodes are described by the
members of :class:`~pyamalgam.amalgamation.TargetNet` (``trunk``, ``branches``, ``outputs``...)
because this floor does not import it; :mod:`pyamalgam.deploy` builds them.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .._io import atomic_write
from ..losses import (
    DepthTask,
    EdgeTask,
    KeypointTask,
    NormalTask,
    SegmentationTask,
    get_task,
)
from ..nn import ChannelCoding
from . import records
from .connected import ConnectedCoding, ConnectedTail
from .heads import DepthHead, EdgeHead, KeypointHead, NormalHead, SegmentationHead
from .sequential import SequentialBlockNet, _HeadOnly
from .smp import SMPBlockNet, SMPHead
from .vgg import DecoderBlock, EncoderBlock, VGGEncoderDecoder

__all__ = [
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "META_KEY",
    "build_block",
    "build_coding",
    "build_head",
    "build_network",
    "build_task",
    "describe",
    "dtype_of",
    "model_meta",
    "save_model",
    "state_digest",
]

FORMAT = "pyamalgam-model"
FORMAT_VERSION = 1
#: The safetensors header's ``__metadata__`` entry that holds the JSON record.
META_KEY = "pyamalgam-model"
_TASKS = {"segmentation": SegmentationTask, "depth": DepthTask, "normal": NormalTask, "edges": EdgeTask,
          "keypoints": KeypointTask}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_model(net: nn.Module, path, *, resolution: tuple | None = None, extra: Mapping | None = None) -> Path:
    """Write ``net`` (a teacher of :mod:`pyamalgam.models` or a TargetNet) to ``path`` atomically.

    Args:
        net: the network; its floating tensors must share one dtype (stored as it is).
        path: the file (``.safetensors`` by convention); its folder is created.
        resolution: optional (H, W) the network was trained at; ``pyamalgam export`` and
            ``pyamalgam predict`` use it as their default size.
        extra: optional JSON-able notes kept in the file (e.g. the branch points chosen).

    Raises ValueError naming the module that the architecture record cannot describe.
    """
    meta = model_meta(net, resolution=resolution, extra=extra)
    state = _cpu_state(net)
    meta["digest"] = state_digest(state)
    text = json.dumps(meta, allow_nan=False)
    return atomic_write(path, safetensors_bytes(state, metadata={META_KEY: text}))


def model_meta(net: nn.Module, *, resolution=None, extra=None) -> dict:
    """The JSON record of ``net`` (without the digest of its tensors)."""
    arch = describe(net)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "kind": "target_net" if arch["type"] == "target_net" else "teacher",
            "dtype": _dtype_name(net), "architecture": arch}
    if resolution is not None:
        h, w = (int(s) for s in resolution)
        divisor = int(getattr(net, "size_divisor", 1))
        if min(h, w) < 1 or h % divisor or w % divisor:
            raise ValueError(f"resolution must be (H, W), multiples of the size divisor {divisor}, got {resolution!r}")
        meta["resolution"] = [h, w]
    if extra is not None:
        try:
            meta["extra"] = json.loads(json.dumps(dict(extra), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise TypeError(f"extra must be a JSON-able mapping: {e}") from None
    return meta


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes: safetensors has no checksum, and a
    flipped bit in the weights would otherwise load as a silently different network."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


# ------------------------------------------------------------------------------------ describe

def describe(net: nn.Module) -> dict:
    """The architecture node of a network (see the module docstring)."""
    with records.smp_cache():  # each smp model is rebuilt once to check its blocks, not once per block
        return _describe(net)


def _describe(net: nn.Module) -> dict:
    if type(net) is VGGEncoderDecoder:
        return _describe_vgg(net)
    if type(net) in (SequentialBlockNet, _HeadOnly):
        return _describe_sequential(net)
    if type(net) is SMPBlockNet:
        return _checked_network(net, records.describe_smp_net(net, _describe_task))
    if type(net) is ConnectedTail:
        return records.describe_connected_tail(net, describe)
    if isinstance(getattr(net, "branches", None), nn.ModuleDict) and isinstance(getattr(net, "trunk", None), nn.ModuleDict):
        return _describe_target_net(net)
    raise ValueError(f"cannot describe a {type(net).__name__}: a model file holds pyamalgam.models VGG teachers "
                     f"(segnet_vgg, unet_vgg), smp teachers (from_smp), their tails, and TargetNets built from them")


def _describe_vgg(net: VGGEncoderDecoder) -> dict:
    convs = [_describe_block(net.blocks[str(k)], f"block {k}")["convs"] for k in range(1, net.depth + 1)]
    node = {"type": "vgg", "task": _describe_task(net.task), "depth": net.depth, "decoder": net.decoder,
            "channels": list(net.channels), "convs": convs, "in_chans": net.in_chans, "head": _describe_head(net.head)}
    return _checked_network(net, node)


def _checked_network(net: nn.Module, node: dict) -> dict:
    rebuilt = _on_meta(lambda: build_network(node))
    if repr(rebuilt) != repr(net) or _shapes(rebuilt) != _shapes(net):
        raise ValueError(f"this {type(net).__name__} differs from the one its arguments build (a block or the head "
                         f"was replaced); save it as a tail (net.tail(0)) or keep the stock modules")
    return node


def _describe_sequential(net: SequentialBlockNet) -> dict:
    blocks = {k: _describe_block(b, f"block {k}") for k, b in net.blocks.items()}
    return {"type": "sequential", "num_blocks": net.num_blocks, "size_divisor": net.size_divisor, "in_chans": net.in_chans,
            "task": None if net.task is None else _describe_task(net.task), "blocks": blocks,
            "head": None if net.head is None else _describe_head(net.head)}


def _describe_target_net(net) -> dict:
    branches = {}
    for key, br in net.branches.items():
        coding = None if br.coding is None else _checked(br.coding, _describe_coding(br.coding), f"branch {key!r} coding")
        branches[key] = {"point": int(br.point), "coding": coding, "tail": describe(br.tail)}
    return {"type": "target_net", "num_blocks": net.num_blocks, "size_divisor": net.size_divisor, "in_chans": net.in_chans,
            "trunk": {k: _describe_block(b, f"trunk block {k}") for k, b in net.trunk.items()}, "branches": branches,
            "outputs": {key: {name: _describe_task(t) for name, t in out.items()} for key, out in net.outputs.items()},
            "task_weights": {k: float(v) for k, v in net.task_weights.items()}}


def _describe_block(block: nn.Module, where: str) -> dict:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)] if isinstance(block, (EncoderBlock, DecoderBlock)) else []
    if type(block) is EncoderBlock and convs:
        node = {"type": "vgg_encoder", "level": block.level, "in_channels": convs[0].in_channels,
                "out_channels": convs[-1].out_channels, "convs": len(convs), "decoder": block.decoder}
    elif type(block) is DecoderBlock and convs:
        concat = 2 if block.decoder == "concat" else 1
        node = {"type": "vgg_decoder", "level": block.level, "channels": convs[0].in_channels // concat,
                "out_channels": convs[-1].out_channels, "convs": len(convs), "decoder": block.decoder,
                "deepest": bool(block.deepest)}
    elif hasattr(block, "smp_origin"):
        node = records.describe_smp_block(block, where)
    else:
        raise ValueError(f"cannot describe {where}, a {type(block).__name__}: only pyamalgam.models.vgg blocks and "
                         f"the blocks of from_smp")
    return _checked(block, node, where)


def _describe_head(head: nn.Module) -> dict:
    if type(head) is SegmentationHead:
        node = {"type": "segmentation", "in_channels": head.conv.in_channels, "num_classes": head.conv.out_channels}
    elif type(head) is DepthHead:  # bin_size itself, not max_depth: l = max_depth / N_d must come back bit for bit
        node = {"type": "depth", "in_channels": head.conv.in_channels, "num_bins": head.conv.out_channels,
                "bin_size": float(head.bin_size)}
    elif type(head) is NormalHead:
        node = {"type": "normal", "in_channels": head.conv.in_channels}
    elif type(head) in (EdgeHead, KeypointHead):
        node = {"type": "edges" if type(head) is EdgeHead else "keypoints", "in_channels": head.conv.in_channels}
    elif type(head) is SMPHead:
        node = records.describe_smp_head(head)
    else:
        raise ValueError(f"cannot describe the head, a {type(head).__name__}: only SegmentationHead, DepthHead, NormalHead, "
                         f"EdgeHead, KeypointHead and from_smp's SMPHead")
    return _checked(head, node, "the head")


def _describe_coding(coding: nn.Module) -> dict:
    if type(coding) is ConnectedCoding:  # a heterogeneous teacher's branch: the coding, then its connector
        return records.describe_connected_coding(coding, _describe_coding)
    if type(coding) is not ChannelCoding:
        raise ValueError(f"cannot describe a {type(coding).__name__} coding: only ChannelCoding and ConnectedCoding")
    return {"type": "channel_coding", "channels": coding.channels, "hidden": coding.hidden}


def _describe_task(task) -> dict:
    for kind, cls in _TASKS.items():
        if type(task) is cls:
            return {"type": kind, "name": task.name}
    raise ValueError(f"cannot describe the task {task!r}: only segmentation, depth, normal, edges and keypoints tasks "
                     f"(a loss callable "
                     f"is code, which a model file does not hold)")


def _checked(module: nn.Module, node: dict, where: str) -> dict:
    """``node`` if it rebuilds ``module`` exactly (same repr and parameter shapes), else a ValueError."""
    try:
        rebuilt = _on_meta(lambda: _BUILDERS[node["type"]](node))
    except (ValueError, TypeError) as e:
        raise ValueError(f"cannot describe {where}: {e}") from None
    if repr(rebuilt) != repr(module) or _shapes(rebuilt) != _shapes(module):
        raise ValueError(f"cannot describe {where}: it is not the {node['type']} module its sizes build "
                         f"(got {module!r})")
    return node


# -------------------------------------------------------------------------------------- build

def build_task(node: Mapping):
    return get_task(_TASKS[node["type"]](node["name"]))


def build_block(node: Mapping) -> nn.Module:
    if node["type"] == "smp_block":
        return records.build_smp_block(node)
    if node["type"] == "vgg_encoder":
        return EncoderBlock(node["level"], node["in_channels"], node["out_channels"], node["convs"], node["decoder"])
    if node["type"] == "vgg_decoder":
        return DecoderBlock(node["level"], node["channels"], node["out_channels"], node["convs"], node["decoder"],
                            deepest=node["deepest"])
    raise ValueError(f"unknown block type {node['type']!r}")


def build_head(node: Mapping) -> nn.Module:
    if node["type"] == "segmentation":
        return SegmentationHead(node["in_channels"], node["num_classes"])
    if node["type"] == "depth":
        head = DepthHead(node["in_channels"], node["num_bins"], node["bin_size"] * node["num_bins"])
        head.bin_size = float(node["bin_size"])
        return head
    if node["type"] == "normal":
        return NormalHead(node["in_channels"])
    if node["type"] == "edges":
        return EdgeHead(node["in_channels"])
    if node["type"] == "keypoints":
        return KeypointHead(node["in_channels"])
    if node["type"] == "smp_head":
        return records.build_smp_head(node)
    raise ValueError(f"unknown head type {node['type']!r}")


def build_coding(node: Mapping) -> nn.Module:
    if node["type"] == "connected_coding":
        return records.build_connected_coding(node, build_coding)
    if node["type"] != "channel_coding":
        raise ValueError(f"unknown coding type {node['type']!r}")
    channels, hidden = node["channels"], node["hidden"]
    # ChannelCoding takes a reduction; the file records its result (hidden = max(1, C // reduction))
    reduction = next((r for r in range(1, channels + 1) if max(1, channels // r) == hidden), None)
    if reduction is None:
        raise ValueError(f"no channel coding of {channels} channels has {hidden} hidden units")
    return ChannelCoding(channels, reduction)


def build_network(node: Mapping, build_other: Callable[[Mapping], nn.Module] | None = None) -> nn.Module:
    """The untrained network of a ``"vgg"`` or ``"sequential"`` node; other node types go to
    ``build_other`` (:mod:`pyamalgam.deploy` builds TargetNets)."""
    if node["type"] == "vgg":
        head = node["head"]
        extra = {"num_classes": head.get("num_classes", 40), "num_bins": head.get("num_bins", 64),
                 "max_depth": head["bin_size"] * head["num_bins"] if head["type"] == "depth" else 10.0}
        if head["type"] != node["task"]["type"]:
            raise ValueError(f"a {head['type']} head cannot predict the task {node['task']['type']!r}")
        net = VGGEncoderDecoder(_MODEL_TASK[node["task"]["type"]], width=1.0, depth=node["depth"], decoder=node["decoder"],
                                in_chans=node["in_chans"], channels=node["channels"], convs=node["convs"],
                                name=node["task"]["name"], **extra)
        if head["type"] == "depth":
            net.head.bin_size = float(head["bin_size"])
        return net
    if node["type"] == "sequential":
        head = None if node["head"] is None else build_head(node["head"])
        task = None if node["task"] is None else build_task(node["task"])
        blocks = {int(k): build_block(b) for k, b in node["blocks"].items()}
        if not blocks:
            return _HeadOnly(head, task, node["num_blocks"], node["size_divisor"], node["in_chans"])
        return SequentialBlockNet(blocks, head, task, num_blocks=node["num_blocks"], size_divisor=node["size_divisor"],
                                  in_chans=node["in_chans"])
    if node["type"] == "smp":
        return records.build_smp_net(node, build_task)
    if node["type"] == "connected_tail":
        return records.build_connected_tail(node, build_other or build_network)
    if build_other is None:
        raise ValueError(f"a {node['type']!r} node is built by pyamalgam.deploy.load")
    return build_other(node)


_MODEL_TASK = {"segmentation": "segmentation", "depth": "depth", "normal": "normals", "edges": "edges",
               "keypoints": "keypoints"}
_BUILDERS = {"vgg_encoder": build_block, "vgg_decoder": build_block, "segmentation": build_head, "depth": build_head,
             "normal": build_head, "edges": build_head, "keypoints": build_head, "channel_coding": build_coding,
             "smp_block": build_block, "smp_head": build_head, "connected_coding": build_coding}


# ------------------------------------------------------------------------------------ helpers

def _on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):  # shapes without memory: describing a big network allocates nothing
        return factory()


def _shapes(module: nn.Module) -> list:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def _dtype_name(net: nn.Module) -> str:
    dtypes = {t.dtype for t in net.state_dict().values() if t.is_floating_point()}
    names = [k for k, v in DTYPES.items() if {v} == dtypes]
    if not names:
        raise ValueError(f"the network's floating tensors must share one dtype of {sorted(DTYPES)}, got "
                         f"{sorted(str(d) for d in dtypes) or 'none'}")
    return names[0]


def _cpu_state(net: nn.Module) -> dict:
    """The state dict on the CPU, contiguous, with no two tensors on one storage (safetensors refuses)."""
    out, seen = {}, set()
    for key, t in net.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a record's ``dtype`` field."""
    return DTYPES[name]
