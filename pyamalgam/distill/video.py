"""Temporal-consistency distillation for video (thesis 003, ch. 5) on the Distiller: a per-frame
student trained on short clips with the objective of Eq. 5.3,

    l = sum_{t<=T'} l_ce^(t) + lambda ( sum_t l_SF^(t) + sum_t l_tl(Q_t, Q_t+1)
                                        + sum_t l_PF(Q_t, Q_t+1) + l_MF ),   lambda = 0.1,

where SF is the single-frame distillation of ch. 3 (the Distiller's ``pi``/``pa``/``cwd`` terms,
on every frame), TL the motion-guided temporal loss (Eq. 5.1), PF the pair-wise-frames
dependency (Eq. 5.2) and MF the multi-frame dependency (ConvLSTM over self-affinity maps,
§5.3.2), and :class:`RandomSampledTriplets`, Table 5.2's random-sample policy.

Usage::

    d = VideoDistiller(teacher, student, terms=("pi", "pa", "tl", "pf", "mf"), checkpoint_dir="runs/v")
    d.fit(DataLoader(RandomSampledTriplets(clips, anchor=2, pair_flow=...), batch_size=4, shuffle=True), 2)

A batch is a dict of clips: ``"image"`` (B, T, 3, H, W), ``"seg"`` (B, T, H, W; 255 on frames
without labels), ``"flow"`` (B, T-1, 2, H, W) from frame t to t+1 (:mod:`pyamalgam._flow`) and
optionally ``"flow_valid"`` (B, T-1, H, W), the exact visibility. Everything else (tqdm, the
JSON-lines log, atomic checkpoints with bit-identical resume, torchrun, the non-finite guard)
is the Distiller's engine. docs/distiller.md, "Video (thesis ch. 5)", has the rows and deviations.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .._checks import as_real, check_int
from ..losses import MultiFrameLoss, PairWiseFramesLoss, TemporalLoss
from ..losses.tasks import SegmentationTask
from ..models.protocol import check_input
from .distiller import Distiller
from .setup import evaluating, feature_taps, probe_image
from .step import check_scalar
from .taps import TapRunner
from .terms import FEATURES, describe

__all__ = ["LAMBDA", "OCCLUSION", "VIDEO_TERMS", "RandomSampledTriplets", "VideoDistiller", "VideoStep"]

LAMBDA = 0.1  # thesis §5.3.3: "the loss weight for all regularization terms lambda is set to 0.1"
VIDEO_TERMS = ("tl", "pf", "mf")
OCCLUSION = ("auto", "exact", "image", "none")
_OPTIONS = {"tl": ("occlusion",), "pf": ("patch",), "mf": ("patch", "hidden", "clip", "enlarge")}
_DEFAULTS = {"tl": {"occlusion": "auto"}, "pf": {"patch": 1}, "mf": {"patch": 8, "hidden": 16, "clip": 0.1,
                                                                      "enlarge": 0.1}}


def split_terms(terms, lam: float) -> tuple:
    """(single-frame terms for the Distiller, {video term: (weight, options)}) from ``terms``: a
    sequence of names (each weighted ``lam``) or a mapping name -> None (``lam``), a weight or a
    spec dict (``weight`` and the term's options)."""
    if isinstance(terms, (tuple, list)):
        terms = dict.fromkeys(terms)
    if not isinstance(terms, Mapping):
        raise TypeError(f"terms must be a sequence of term names or a mapping name -> weight or spec, "
                        f"got {type(terms).__name__}")
    single, video = {}, {}
    for name, value in terms.items():
        if name == "ho":
            raise ValueError("terms['ho']: the holistic term is not a term of Eq. 5.3 (the video objective takes "
                             f"pi, pa, cwd, your own per-frame terms, and {list(VIDEO_TERMS)})")
        spec = ({} if value is None else dict(value) if isinstance(value, Mapping) else
                {"loss": value} if callable(value) else {"weight": value})
        spec.setdefault("weight", lam)
        if name not in VIDEO_TERMS:
            single[name] = spec
            continue
        weight = as_real(spec.pop("weight"))
        if weight is None or not weight >= 0 or weight == float("inf"):
            raise ValueError(f"terms[{name!r}]: the weight must be a finite number >= 0, got {value!r}")
        unknown = sorted(set(spec) - set(_OPTIONS[name]))
        if unknown:
            raise ValueError(f"terms[{name!r}]: unknown option(s) {unknown}; it takes {['weight', *_OPTIONS[name]]}")
        options = {**_DEFAULTS[name], **spec}
        if options.get("occlusion", "auto") not in OCCLUSION:
            raise ValueError(f"terms['tl']['occlusion'] must be one of {list(OCCLUSION)}, got {options['occlusion']!r}")
        video[name] = (weight, options)
    return single, video


def build_video_losses(video: dict) -> dict:
    """Term name -> loss module: Eq. 5.1 (on logits), Eq. 5.2 (logits -> probabilities), MF."""
    losses = {}
    for name, (_, options) in video.items():
        try:
            if name == "tl":
                losses[name] = TemporalLoss()
            elif name == "pf":
                losses[name] = PairWiseFramesLoss(options["patch"], softmax=True)
            else:
                losses[name] = MultiFrameLoss(**options)
        except (TypeError, ValueError) as e:
            raise type(e)(f"terms[{name!r}]: {e}") from None
    return losses


class VideoStep(nn.Module):
    """The student's side of a video step (what the engine trains and wraps in DDP): the student,
    the single-frame terms' losses and the temporal terms' (MF's ConvLSTM trains with the student,
    thesis §5.3.2). ``forward(frames, clips, teacher_output, teacher_features, motion)`` ->
    ``(student_output (B*T, K, H, W), {term: value})``, each term summed over frames / pairs as in
    Eq. 5.3 and averaged over the clips."""

    def __init__(self, student, runner, specs, losses: Mapping, video: dict, feature_key: tuple | None):
        super().__init__()
        self.student = student
        self.losses = nn.ModuleDict(dict(losses))
        self._runner, self._specs = runner, [s for s in specs if not s.holistic]
        self._video, self._feature_key = video, feature_key

    def forward(self, frames, clips: int, teacher_output, teacher_features, motion: dict):
        if "mf" in self.losses:  # thesis §5.3.2: the ConvLSTM's weights stay clipped (after every step)
            self.losses["mf"].clip_()
        output, features = self._runner.run(frames)
        steps = frames.shape[0] // clips
        values = {}
        for spec in self._specs:  # sum_t l_SF^(t): the frames' mean times T
            ys = output if spec.student.kind == "output" else features[spec.student.key]
            yt = teacher_output if spec.teacher.kind == "output" else teacher_features[spec.teacher.key]
            values[spec.name] = steps * check_scalar(spec.name, self.losses[spec.name](ys, yt))
        s = output.unflatten(0, (clips, steps))
        t = None if teacher_output is None else teacher_output.unflatten(0, (clips, steps))
        if "tl" in self._video:
            values["tl"] = sum(self._tl(s, motion, k) for k in range(steps - 1))
        if "pf" in self._video:
            values["pf"] = sum(check_scalar("pf", self.losses["pf"](s[:, k], s[:, k + 1], t[:, k], t[:, k + 1]))
                               for k in range(steps - 1))
        if "mf" in self._video:
            fs = features[self._feature_key[0]].unflatten(0, (clips, steps)).unbind(1)
            ft = teacher_features[self._feature_key[1]].unflatten(0, (clips, steps)).unbind(1)
            values["mf"] = check_scalar("mf", self.losses["mf"](fs, ft))
        return output, values

    def _tl(self, s, motion, k):
        flow = motion["flow"][:, k]
        mode = self._video["tl"][1]["occlusion"]
        if mode == "auto":
            mode = "exact" if motion.get("flow_valid") is not None else "image"
        if mode == "exact":
            if motion.get("flow_valid") is None:
                raise KeyError("terms['tl'] with occlusion='exact' needs batch['flow_valid'] (B, T-1, H, W)")
            return check_scalar("tl", self.losses["tl"](s[:, k], s[:, k + 1], flow, visible=motion["flow_valid"][:, k]))
        images = (motion["image"][:, k], motion["image"][:, k + 1]) if mode == "image" else None
        return check_scalar("tl", self.losses["tl"](s[:, k], s[:, k + 1], flow, images=images))


class VideoDistiller(Distiller):
    """Distils a frozen ``teacher`` into a per-frame segmentation ``student`` on clips (Eq. 5.3).

    Args:
        terms: names (each weighted ``lam``) or a mapping name -> None (``lam``), weight or spec:
            the single-frame terms of the Distiller (``pi``, ``pa``, ``cwd``, your own; SF of
            Eq. 5.3, applied to every frame) and ``tl`` (Eq. 5.1; option ``occlusion``: "auto"
            (the exact ``flow_valid`` when the batch has it, else the thesis' exp(-|I_t - I^|)),
            "exact", "image", "none"), ``pf`` (Eq. 5.2; ``patch``, default 1), ``mf`` (§5.3.2;
            ``patch`` (default 8: the thesis' F is at 1/8 resolution; the N x N self-affinity
            maps are materialised), ``hidden`` (D_e, 16), ``clip`` (0.1), ``enlarge`` (0.1)). An
            empty mapping: the per-frame baseline (scheme a of Table 5.1), cross-entropy on the
            labelled frames only.
        lam: the lambda of Eq. 5.3, the default weight of every term (0.1, §5.3.3).
        task_loss: None (sum over the labelled frames of the mean cross-entropy of their
            labelled pixels, Eq. 5.3's first sum) or False (none).
        flow: where a batch has no ``"flow"``: a callable ``(frames_t, frames_t1) -> flow``
            (B, 2, H, W) that estimates it (the thesis' FlowNet); None: the batch must have it.
        Other keywords: the :class:`~pyamalgam.distill.Distiller`'s (optimizer, lr, checkpoint_dir,
        checkpoint_every, log_dir, progress, channels_last, ignore_index, taps, ...). ``taps``
        also sets MF's feature map (default: each network's last block, the thesis' F).
    """

    def __init__(self, teacher, student, *, terms, lam: float = LAMBDA, task_loss=None,
                 flow: Callable | None = None, **kwargs):
        lam_value = as_real(lam)
        if lam_value is None or not 0 <= lam_value < float("inf"):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if task_loss is not None and task_loss is not False:
            raise TypeError("task_loss of the VideoDistiller must be None (Eq. 5.3's cross-entropy) or False")
        if flow is not None and not callable(flow):
            raise TypeError(f"flow must be a callable (frames_t, frames_t1) -> flow or None, got {type(flow).__name__}")
        tasks = getattr(student, "tasks", None)
        if not isinstance(tasks, Mapping) or len(tasks) != 1 or not isinstance(next(iter(tasks.values())),
                                                                                 SegmentationTask):
            raise TypeError(f"the video student must be a segmentation network (TL and PF compare class "
                            f"probabilities); {type(student).__name__} declares tasks {tasks!r}")
        single, video = split_terms(terms, lam_value)
        if not single and not video and task_loss is False:
            raise ValueError("terms is empty and task_loss=False: nothing to train")
        # The Distiller checks and builds the single-frame terms, the taps, the engine and the lock.
        super().__init__(teacher, student, terms=single, task_loss=None, **kwargs)
        self.lam, self.flow_fn, self._video = lam_value, flow, video
        self._use_ce = task_loss is None
        self.specs_video = video
        feature_key = None
        if "mf" in video:  # MF reads the feature map F of both networks (the Distiller's feature tap)
            mf = feature_taps(kwargs.get("taps"), teacher, student)
            if FEATURES in mf:
                raise ValueError("terms['mf'] reads the feature map F of both networks: without block-protocol "
                                 "networks, pass taps={'student': ('module', name), 'teacher': ('module', name)}")
            self.student_taps = TapRunner(student, [s.student for s in self.specs] + [mf[0]], "student")
            self.teacher_taps = TapRunner(teacher, [s.teacher for s in self.specs] + [mf[1]], "teacher")
            feature_key = (mf[0].key, mf[1].key)
        losses = {**dict(self.step_module.losses), **build_video_losses(video)}
        self.step_module = VideoStep(student, self.student_taps, self.specs, losses, video, feature_key).to(self.device)
        self._probe_video(kwargs.get("probe_size"))

    @property
    def weights(self) -> dict:
        """Term name -> weight (Eq. 5.3's lambda unless given)."""
        return {**{s.name: s.weight for s in self.specs}, **{k: w for k, (w, _) in self._video.items()}}

    # ------------------------------------------------------------------ the step

    def _objective(self, trainable, batch, critic: bool):
        """Eq. 5.3 on one batch of clips: (total, logged values)."""
        frames, clips, steps, motion = self._frames(batch)
        t_out, t_features = None, {}
        if self.specs or self._video.keys() - {"tl"}:
            with torch.no_grad():
                t_out, t_features = self.teacher_taps.run(frames)
        s_out, terms = trainable(frames, clips, t_out, t_features, motion)
        total = s_out.new_zeros((), dtype=torch.float32)
        for name, weight in self.weights.items():
            total = total + weight * terms[name]
        if self._use_ce:
            ce, labelled = self._cross_entropy(s_out, batch, clips, steps)
            terms["mc"], terms["labelled"] = ce, labelled
            total = total + ce
        terms["total"] = total
        return total, terms

    def _frames(self, batch):
        if not isinstance(batch, Mapping) or "image" not in batch:
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise KeyError(f"a video batch is a dict with 'image' (B, T, 3, H, W) (and 'seg', 'flow'); got {got}")
        x = batch["image"]
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            raise ValueError(f"batch['image'] must be clips (B, T, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        clips, steps = x.shape[:2]
        if steps < 2 and self._video:
            raise ValueError(f"batch['image'] has T = {steps} frame(s); the temporal terms need T >= 2")
        frames = x.flatten(0, 1)
        check_input(frames, getattr(self.student, "in_chans", 3), getattr(self.student, "size_divisor", 1),
                    "batch['image'] (frames)")
        frames = frames.to(self.device, non_blocking=True)
        if self.channels_last:
            frames = frames.contiguous(memory_format=torch.channels_last)
        motion = {"image": x.to(self.device)} if "tl" in self._video else {}
        if "tl" in self._video:
            motion["flow"] = self._flow(batch, motion["image"])
            if "flow_valid" in batch:
                motion["flow_valid"] = _shaped(batch, "flow_valid", (clips, steps - 1, *x.shape[3:])).to(self.device)
        return frames, clips, steps, motion

    def _flow(self, batch, x):
        clips, steps = x.shape[:2]
        if "flow" in batch:
            return _shaped(batch, "flow", (clips, steps - 1, 2, *x.shape[3:])).to(self.device).float()
        if self.flow_fn is None:
            raise KeyError("terms['tl'] needs batch['flow'] (B, T-1, 2, H, W), frame t -> t+1 in pixels, or "
                           "VideoDistiller(flow=estimator)")
        with torch.no_grad():  # the flow network is fixed (thesis §5.3.3)
            flows = [self.flow_fn(x[:, k], x[:, k + 1]) for k in range(steps - 1)]
        return torch.stack(flows, 1).float()

    def _cross_entropy(self, s_out, batch, clips, steps):
        """sum_{t <= T'} l_ce^(t): per frame, the mean cross-entropy over its labelled pixels (a
        frame without any adds 0), summed over the frames, averaged over the clips."""
        if not isinstance(batch, Mapping) or "seg" not in batch:
            zero = s_out.new_zeros((), dtype=torch.float32)
            return zero, zero
        seg = _shaped(batch, "seg", (clips, steps, *s_out.shape[2:])).to(s_out.device).flatten(0, 1)
        valid = seg != self.ignore_index
        ce = F.cross_entropy(s_out.float(), seg, ignore_index=self.ignore_index, reduction="none")
        per_frame = ce.sum((1, 2)) / valid.sum((1, 2)).clamp_min(1)
        labelled = valid.flatten(1).any(1).unflatten(0, (clips, steps)).any(1)
        return per_frame.unflatten(0, (clips, steps)).sum(1).mean(), labelled.float().mean()

    # ------------------------------------------------------------------ setup

    def _probe_video(self, size) -> None:
        """Try the temporal terms on a two-frame probe clip (zero flow), naming the term that fails."""
        if not self._video:
            return
        dtype = next((p.dtype for p in self.student.parameters() if p.is_floating_point()), torch.float32)
        x = probe_image(self.teacher, self.student, size).to(self.device, dtype)
        h, w = x.shape[2:]
        batch = {"image": torch.cat([x, x]).unsqueeze(0), "flow": torch.zeros(1, 1, 2, h, w, device=self.device),
                 "flow_valid": torch.ones(1, 1, h, w, dtype=torch.bool, device=self.device)}
        try:
            with evaluating(self.step_module):
                self._objective(self.step_module, batch, critic=False)
        except (TypeError, ValueError, RuntimeError) as e:
            raise type(e)(f"the video terms {sorted(self._video)} fail on a probe clip: {e}") from None

    def _config(self) -> dict:
        config = super()._config()
        config["video"] = {"lam": self.lam, "ce": self._use_ce, "flow": None if self.flow_fn is None else
                           describe(self.flow_fn),
                           "terms": {k: {"weight": w, "options": o, "loss": describe(self.step_module.losses[k])}
                                     for k, (w, o) in self._video.items()}}
        return config


def _shaped(batch, key, shape) -> torch.Tensor:
    t = batch[key]
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"batch[{key!r}] must be {tuple(shape)} for these clips, got {got}")
    return t


class RandomSampledTriplets(Dataset):
    """Table 5.2's random-sample policy: from clips of L frames with one labelled frame at
    position ``anchor``, the training triplets (frame_f, labelled frame, frame_b) with frame_f any
    frame before it and frame_b any after it (thesis §5.3.4), as items of their own, so the
    loader's shuffle draws them (and a resumed run draws the same). ``policy="adjacent"`` keeps
    only the frames right next to the labelled one (the rows without RS).

    Args:
        clips: a sequence of clip dicts ("image" (L, 3, H, W), "seg" (L, H, W), "flow" (L-1, 2, H,
            W), optionally "flow_valid" (L-1, H, W)); only the anchor's labels are kept (the
            others become ``ignore_index``: the thesis' sparse labels, T' = 1).
        anchor: the labelled frame's position, 1 <= anchor <= L-2.
        pair_flow: ``(clip, source, target) -> (flow (2, H, W), valid (H, W) or None)`` for the
            frame pairs that are not neighbours (``SyntheticClips.flow``, or a flow network);
            needed with ``policy="random"``.
    """

    def __init__(self, clips, anchor: int, *, policy: str = "random", pair_flow: Callable | None = None,
                 ignore_index: int = 255):
        self.clips = clips
        if len(clips) == 0:
            raise ValueError("clips is empty")
        length = clips[0]["image"].shape[0]
        self.anchor = check_int("anchor", anchor, minimum=1)
        if self.anchor > length - 2:
            raise ValueError(f"anchor must leave a frame on each side: 1 <= anchor <= {length - 2}, got {anchor}")
        if policy not in ("random", "adjacent"):
            raise ValueError(f"policy must be 'random' or 'adjacent', got {policy!r}")
        if policy == "random" and pair_flow is None and length > 3:
            raise ValueError("policy='random' samples frames that are not neighbours: pass pair_flow")
        self.policy, self.pair_flow, self.ignore_index = policy, pair_flow, ignore_index
        a = self.anchor
        pairs = [(a - 1, a + 1)] if policy == "adjacent" else [(f, b) for f in range(a) for b in range(a + 1, length)]
        self.items = [(i, f, b) for i in range(len(clips)) for f, b in pairs]
        for name in ("num_classes", "class_names", "max_depth"):
            if hasattr(clips, name):
                setattr(self, name, getattr(clips, name))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        i, f, b = self.items[index]
        clip, a = self.clips[i], self.anchor
        keep = [f, a, b]
        seg = torch.full_like(clip["seg"][keep], self.ignore_index)
        seg[1] = clip["seg"][a]
        flows, valids = zip(*(self._flow(i, clip, s, t) for s, t in ((f, a), (a, b))))
        item = {"image": clip["image"][keep], "seg": seg, "flow": torch.stack(flows)}
        if all(v is not None for v in valids):
            item["flow_valid"] = torch.stack(valids)
        return item

    def _flow(self, i, clip, s, t):
        if t == s + 1:
            return clip["flow"][s], clip["flow_valid"][s] if "flow_valid" in clip else None
        flow, valid = self.pair_flow(i, s, t)
        return flow, valid
