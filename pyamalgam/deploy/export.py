"""Export a network with ``torch.export``: an ONNX model or a ``.pt2`` program (issue 13).

The graph ``torch.export`` traces holds the fused operators as ``pyamalgam::`` nodes
(``channel_coding`` in every branch, ``soft_argmax_depth`` in a depth head), which neither ONNX
Runtime nor a plain ``torch.export.load`` without pyamalgam can run. :func:`decompose` replaces
each by its plain-PyTorch formula from :mod:`pyamalgam.ops.reference` (same signature, same
semantics: paper 001 Fig. 3 and Eq. 2), and :func:`export_model` refuses to write a graph in which
one is left. ``keep_ops=True`` (``.pt2`` only) keeps them: faster in PyTorch, but the program
then loads only where pyamalgam is imported.

Sizes: SegNet-style max-unpooling needs H and W to be multiples of the size divisor 2^depth, so a
``dynamic`` export has a free batch and H = divisor * h', W = divisor * w' for any h', w' >= 1
(sizes that are no multiple are refused by the runtime's shape check); a static export takes
exactly one (1, C, H, W).
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .._io import atomic_write
from ..ops import reference

__all__ = [
    "FORMATS",
    "Exported",
    "OutputTuple",
    "check_export",
    "decompose",
    "default_resolution",
    "export_model",
    "export_ok",
    "export_program",
    "pyamalgam_nodes",
]

FORMATS = ("onnx", "pt2")
#: The fused operators a network's forward can contain, with the reference formula of each.
INFERENCE_OPS = ("channel_coding", "soft_argmax_depth")
MAX_BATCH = 4096
MAX_SIDE = 1 << 14


class OutputTuple(nn.Module):
    """``net`` with its outputs as a tuple in the order of ``names`` (ONNX has no dicts)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.names = list(getattr(net, "tasks", {})) or ["output"]

    def forward(self, image):
        out = self.net(image)
        if isinstance(out, Mapping):
            return tuple(out[name] for name in self.names)
        return (out,)


class Exported(NamedTuple):
    """What :func:`export_model` wrote: the file, output names, traced input shape, the
    ``pyamalgam::`` nodes left in it (empty unless ``keep_ops``)."""

    path: Path
    names: list
    shape: tuple
    fused_ops: list


def default_resolution(divisor: int, side: int = 256) -> tuple:
    """(side, side) rounded up to a multiple of ``divisor``: what an export without a size uses."""
    s = max(1, math.ceil(side / divisor)) * divisor
    return s, s


def decompose(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with every fused inference operator replaced by its reference formula."""
    table = {}
    for name in INFERENCE_OPS:
        op = getattr(torch.ops.pyamalgam, name).default
        table[op] = getattr(reference, name)
    return program.run_decompositions(table)


def pyamalgam_nodes(program: torch.export.ExportedProgram) -> list:
    """The ``pyamalgam::`` operators called in ``program``'s graph (one entry per call)."""
    return [str(n.target) for n in program.graph.nodes
            if n.op == "call_function" and getattr(n.target, "namespace", None) == "pyamalgam"]


def export_program(net: nn.Module, resolution, *, dynamic: bool = False, keep_ops: bool = False):
    """``torch.export`` of ``net`` (eval mode, no grad) on a (1 or 2, C, H, W) example.

    Returns (program, example input, output names). H and W must be multiples of
    ``net.size_divisor``.
    """
    h, w = _check_resolution(net, resolution)
    divisor, c = int(getattr(net, "size_divisor", 1)), int(getattr(net, "in_chans", 3))
    wrapped = OutputTuple(net).eval()
    dims = None
    if dynamic:
        # torch.export specialises sizes 0 and 1: trace a batch of 2 and at least 2 divisors a side
        h, w = (max(s, 2 * divisor) for s in (h, w))
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        hb = torch.export.Dim("height_blocks", min=1, max=MAX_SIDE // divisor)
        wb = torch.export.Dim("width_blocks", min=1, max=MAX_SIDE // divisor)
        dims = ({0: batch, 2: divisor * hb, 3: divisor * wb},)
    dtype = next(net.parameters()).dtype
    example = torch.rand(2 if dynamic else 1, c, h, w, generator=torch.Generator().manual_seed(0)).to(dtype)
    example = example.to(next(net.parameters()).device)
    with torch.no_grad():
        program = torch.export.export(wrapped, (example,), dynamic_shapes=dims)
    if not keep_ops:
        program = decompose(program)
        left = pyamalgam_nodes(program)
        if left:
            raise RuntimeError(f"no decomposition for the fused operator(s) {sorted(set(left))}; they cannot be exported")
    return program, example, wrapped.names


def export_model(net: nn.Module, path, format: str = "onnx", *, resolution=None, dynamic: bool = False,
                 keep_ops: bool = False) -> Exported:
    """Write ``net`` to ``path`` as ONNX (``format="onnx"``, opset of torch's exporter) or as a
    ``torch.export`` program (``"pt2"``), atomically.

    Args:
        resolution: (H, W) of the traced input, multiples of ``net.size_divisor`` (default
            :func:`default_resolution`).
        dynamic: free batch and image size (multiples of the divisor); else exactly (1, C, H, W).
        keep_ops: ``.pt2`` only: keep the fused ``pyamalgam::`` operators (loads only with pyamalgam).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if keep_ops and format == "onnx":
        raise ValueError("keep_ops: ONNX has no pyamalgam operators; an ONNX export always decomposes them")
    net = net.eval()
    resolution = resolution or default_resolution(int(getattr(net, "size_divisor", 1)))
    program, example, names = export_program(net, resolution, dynamic=dynamic, keep_ops=keep_ops)
    if format == "pt2":
        buf = io.BytesIO()
        torch.export.save(program, buf)
        data = buf.getvalue()
    else:
        data = _onnx_bytes(program, example, names)
    path = atomic_write(path, data)
    return Exported(path, names, tuple(example.shape), pyamalgam_nodes(program) if keep_ops else [])


def _onnx_bytes(program, example, names) -> bytes:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise ImportError('ONNX export needs onnx and onnxscript: pip install "pyamalgam[export]"') from None
    with contextlib.redirect_stdout(sys.stderr):  # the exporter prints its progress; stdout is the caller's
        onnx_program = torch.onnx.export(program, (example,), dynamo=True, input_names=["image"], output_names=names,
                                         optimize=True, verbose=False)
    proto = onnx_program.model_proto
    foreign = sorted({n.op_type for n in proto.graph.node if "pyamalgam" in (n.domain + n.op_type)})
    if foreign:
        raise RuntimeError(f"the ONNX graph still calls {foreign}")
    return proto.SerializeToString()


def check_export(exported: Exported, net: nn.Module, format: str, *, dynamic: bool = False) -> dict:
    """Run the written file on a fresh random input (another batch and size when ``dynamic``).

    Returns output name -> ``max_abs_diff`` (max |file - PyTorch|), ``max_abs`` (max |PyTorch|)
    and ``torch_float32_error`` (max |PyTorch - PyTorch in float64|: how well conditioned the
    output is; normals of an untrained network, L2-normalised from tiny vectors, amplify every
    rounding), or None for ONNX without onnxruntime. :func:`export_ok` judges it.
    """
    b, c, h, w = exported.shape
    if dynamic:
        divisor = int(getattr(net, "size_divisor", 1))
        b, h, w = b + 1, h + divisor, w + divisor  # not the traced shape
    param = next(net.parameters())
    x = torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(1)).to(param.dtype)
    got = _run_file(exported.path, format, x)
    if got is None:
        return None
    with torch.no_grad():
        want = OutputTuple(net.eval())(x.to(param.device))
        wide = OutputTuple(copy.deepcopy(net).double().eval())(x.double().to(param.device))
    out = {}
    for name, g, e, e64 in zip(exported.names, got, want, wide):
        e = e.detach().float().cpu()
        out[name] = {"max_abs_diff": float((torch.as_tensor(g).float() - e).abs().max()), "max_abs": float(e.abs().max()),
                     "torch_float32_error": float((e.double() - e64.cpu().double()).abs().max())}
    return out


def export_ok(diffs: dict, tolerance: float = 1e-4) -> dict:
    """The outputs of :func:`check_export` that fail: off by more than ``tolerance`` (relative to
    the output's largest value, at least 1) *and* by more than 10x PyTorch's own float32 error."""
    return {k: v for k, v in diffs.items()
            if v["max_abs_diff"] > max(tolerance * max(1.0, v["max_abs"]), 10 * v["torch_float32_error"])}


def _run_file(path, format, x):
    if format == "pt2":
        program = torch.export.load(str(path))
        with torch.no_grad():
            return [t.cpu() for t in program.module()(x)]
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def _check_resolution(net, resolution) -> tuple:
    divisor = int(getattr(net, "size_divisor", 1))
    try:
        h, w = (int(s) for s in resolution)
    except (TypeError, ValueError):
        raise ValueError(f"resolution must be (H, W), got {resolution!r}") from None
    if min(h, w) < 1 or h % divisor or w % divisor:
        raise ValueError(f"resolution {h}x{w}: H and W must be positive multiples of the size divisor {divisor} "
                         f"(2^depth: SegNet's max-unpooling needs exact halvings)")
    return h, w
