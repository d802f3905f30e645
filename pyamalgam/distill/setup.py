"""What a :class:`~pyamalgam.distill.Distiller` checks and builds once, when it is made: the two
networks, the hyper-parameters, the feature taps, and each term's loss, tried on a probe image
so that a term that cannot work (a tap that does not exist, PI on a one-channel output,
feature maps of different sizes) fails now, naming the term, rather than at the first step."""
from __future__ import annotations

import contextlib
import hashlib
import math

import torch
from torch import nn

from .._checks import as_int, as_real
from ..models.protocol import BlockNetwork, protocol_gap
from .step import check_scalar
from .taps import Tap, parse_side_taps
from .terms import FEATURES, build_loss, resolve_features

__all__ = ["check_networks", "check_hparams", "feature_taps", "resolve_all", "probe_image", "probe", "build_losses",
           "make_holistic", "digest", "evaluating"]


def check_networks(teacher, student) -> None:
    for name, net in (("teacher", teacher), ("student", student)):
        if not isinstance(net, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(net).__name__}")
    if teacher is student:
        raise ValueError("teacher and student must be two networks (the teacher is frozen, the student trains)")
    shared = {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}
    if shared:
        raise ValueError(f"teacher and student share {len(shared)} parameter tensor(s); freezing the teacher "
                         f"would freeze them in the student: give the student its own copy")


def check_hparams(**values) -> None:
    """lr > 0, 0 <= momentum < 1, weight_decay >= 0, power >= 0, all finite."""
    bounds = {"lr": (0, None, False), "momentum": (0, 1, True), "weight_decay": (0, None, True),
              "power": (0, None, True)}
    for name, value in values.items():
        lo, hi, closed = bounds[name]
        v = as_real(value)
        ok = v is not None and math.isfinite(v) and (v >= lo if closed else v > lo) and (hi is None or v < hi)
        if not ok:
            rng = f"{'>=' if closed else '>'} {lo}" + ("" if hi is None else f" and < {hi}")
            raise ValueError(f"{name} must be a finite number {rng}, got {value!r}")


def feature_taps(taps, teacher, student) -> tuple:
    """(student tap, teacher tap) of the feature terms that name none (pa, cwd): ``taps`` (one
    tap for both, or {"student": ..., "teacher": ...}); by default each network's last block,
    the thesis' feature map F (the input of the classifier, §3.3)."""
    default = tuple(Tap("block", net.num_blocks) if protocol_gap(net, BlockNetwork) is None else FEATURES
                    for net in (student, teacher))
    return default if taps is None else parse_side_taps(taps, "taps", default)


def resolve_all(specs, taps: tuple, teacher, student) -> None:
    """Give the feature terms that name no tap the Distiller's feature taps."""
    for spec in specs:
        resolve_features(spec, taps)
        for side, tap, net in (("student", spec.student, student), ("teacher", spec.teacher, teacher)):
            if tap is FEATURES:
                raise ValueError(f"terms[{spec.name!r}]: the {side} ({type(net).__name__}) is not a block-protocol "
                                 f"network, so the feature terms have no default tap there: pass "
                                 f"taps={{{side!r}: ('module', name)}} or the term's 'tap'")


def probe_image(teacher, student, size) -> torch.Tensor:
    """One image the networks accept: ``size`` (H, W), by default twice the divisibility both
    need (at least 16 x 16). Drawn from its own generator: the global RNG is left alone."""
    chans = as_int(getattr(student, "in_chans", getattr(teacher, "in_chans", 3))) or 3
    if size is None:
        div = math.lcm(*(as_int(getattr(net, "size_divisor", 1)) or 1 for net in (student, teacher)))
        size = (max(2 * div, 16),) * 2
    h, w = (as_int(size[0]), as_int(size[1])) if isinstance(size, (tuple, list)) and len(size) == 2 else (None, None)
    if h is None or w is None or h < 1 or w < 1:
        raise ValueError(f"probe_size must be (H, W) of positive ints, got {size!r}")
    return torch.rand(1, chans, h, w, generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def evaluating(*modules):
    """Inside the block, ``modules`` (the nn.Modules among them) in eval mode and no gradients;
    each module's mode is restored after: an objective evaluated, not trained (BatchNorm neither
    updates nor needs batch statistics, no dropout)."""
    modules = [m for m in modules if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def probe(runner, x) -> tuple:
    """(output, features) of ``runner``'s network on ``x`` in eval mode (its mode restored)."""
    with evaluating(runner.net):  # one probe image: no batch statistics
        output = runner.check_forward(x)
        return output, runner.run(x)[1]


def build_losses(specs, student_probe, teacher_probe) -> dict:
    """Term name -> loss module for every non-holistic term, each tried on the probe."""
    losses = {}
    for spec in specs:
        if spec.holistic:
            continue
        ys, yt = _inputs(spec, student_probe, teacher_probe)
        if not isinstance(ys, torch.Tensor) or not isinstance(yt, torch.Tensor):
            raise TypeError(f"terms[{spec.name!r}] reads no tensor")
        channels = (ys.shape[1] if ys.dim() == 4 else 1, yt.shape[1] if yt.dim() == 4 else 1)
        loss = build_loss(spec, *channels)
        loss.to(ys.device, ys.dtype if ys.is_floating_point() else None)  # a connector: the features' dtype
        try:
            with torch.no_grad():
                check_scalar(spec.name, loss(ys, yt))
        except (TypeError, ValueError, RuntimeError) as e:
            raise type(e)(f"terms[{spec.name!r}] cannot read the student's {spec.student} {tuple(ys.shape)} and "
                          f"the teacher's {spec.teacher} {tuple(yt.shape)} (on a probe image): {e}") from None
        losses[spec.name] = loss
    return losses


def _inputs(spec, student_probe, teacher_probe):
    def pick(tap, result):
        output, features = result
        return output if tap.kind == "output" else features[tap.key]

    return pick(spec.student, student_probe), pick(spec.teacher, teacher_probe)


def make_holistic(spec, student_output: torch.Tensor, device):
    """The holistic term's object: the one given, or ``HolisticDistillation(num_classes=C of the
    student's output, **options)`` from :mod:`pyamalgam.losses.holistic`."""
    ho = spec.loss
    channels = student_output.shape[1] if student_output.dim() == 4 else 1
    if ho is None:
        try:
            from ..losses.holistic import HolisticDistillation
        except ImportError as e:
            raise ValueError(f"terms['ho']: pyamalgam.losses.holistic is not available ({e}); pass "
                             f"terms={{'ho': an object with forward(student_map, image), critic_step, state_tensors, "
                             f"load_state_tensors}}") from None
        try:
            ho = HolisticDistillation(channels, **spec.options)
        except (TypeError, ValueError) as e:
            raise type(e)(f"terms['ho']: {e}") from None
    expected = getattr(ho, "num_classes", None)
    if as_int(expected) is not None and expected != channels:
        raise ValueError(f"terms['ho']: the critic takes {expected}-channel maps, the student predicts {channels}")
    if isinstance(ho, nn.Module):
        ho.to(device)
    return ho


def digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes, bytes): the teacher a checkpoint was
    distilled from, so that a resume with another teacher is refused."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
