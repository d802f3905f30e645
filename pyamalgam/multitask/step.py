"""One multi-task step: the network, its task weighting and the self-distillation adaptors as
the module the engine trains (DDP sees every parameter inside :meth:`MultiTaskStep.forward`)."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .objectives import pool_to, sd_feature_loss

__all__ = ["MultiTaskStep", "check_batch", "teacher_kd"]

_NEEDS_MASK = ("depth", "normal")


class MultiTaskStep(nn.Module):
    """``forward(image, batch, teacher_kd=None) -> (total, terms)``, the objective of one batch:

    ``sum_t w_t L_t(T_t)`` (the weighting), ``+ kd_weight * mean_t kd_t(T_t, teacher_t)`` with
    external teachers (Baseline-3), and with self-distillation ``sd``
    (:class:`~pyamalgam.multitask.objectives.SelfDistillation`): ``+ shallow_weight * sum_t w_t
    L_t(S_t) + feature_weight * L_feature (+ output_weight * L_output for ★★)``.
    """

    def __init__(self, net, specs: Mapping, weighting: nn.Module, sd=None, kd_weight: float = 0.0,
                 ignore_index: int = 255):
        super().__init__()
        self.net, self.weighting = net, weighting
        self.specs, self.sd, self.kd_weight, self.ignore_index = dict(specs), sd, float(kd_weight), ignore_index
        sources = sd.sources(specs) if sd is not None and sd.space == "encoder" else []
        self.adaptors = nn.ModuleDict({t: nn.Conv2d(net.channels[0], net.encoded_channels, 1) for t in sources})

    def forward(self, image, batch, teacher_kd=None):
        out = self.net.forward_train(image, shallow=self.sd is not None)
        label = {t: spec.label_loss(out["outputs"][t], batch, self.ignore_index) for t, spec in self.specs.items()}
        total, weights = self.weighting(label)
        terms = {f"{t}/label": v for t, v in label.items()}
        if teacher_kd is not None:
            kd = torch.stack([self.specs[t].kd_loss(out["kd"][t], teacher_kd[t]) for t in teacher_kd]).mean()
            terms["kd"] = kd
            total = total + self.kd_weight * kd
        if self.sd is not None:
            total = total + self._self_distillation(out, batch, weights, terms)
        terms["total"] = total
        return total, terms

    def _self_distillation(self, out, batch, weights, terms):
        sd = self.sd
        s_label = sum(weights[t] * spec.label_loss(out["s_outputs"][t], batch, self.ignore_index)
                      for t, spec in self.specs.items())
        e = out["encoded"]
        feature = []
        for t in sd.sources(self.specs):
            d = pool_to(out["features"][t].detach(), e)  # sg(P(D_t)): the decoder is the teacher
            if sd.space == "encoder":  # SD-MTCNN: the shared encoder space (E is the student)
                feature.append(sd_feature_loss(e, self.adaptors[t](d)))
            else:  # SD-Vanilla: the decoder space (the S path's adaptor is the student)
                feature.append(sd_feature_loss(out["s_adapted"][t], d))
        terms["s/label"], terms["sd/feature"] = s_label, torch.stack(feature).mean()
        extra = sd.shallow_weight * s_label + sd.feature_weight * terms["sd/feature"]
        if sd.variant == "star2":
            output = torch.stack([self.specs[t].kd_loss(out["s_kd"][t], out["kd"][t].detach())
                                  for t in sd.sources(self.specs)]).mean()
            terms["sd/output"] = output
            extra = extra + sd.output_weight * output
        return extra


def check_batch(batch, tasks) -> None:
    """A labelled dict batch for every task (and a mask for depth / normals), or a clear error."""
    if not isinstance(batch, Mapping) or "image" not in batch:
        raise TypeError("the multi-task trainer needs dict batches with 'image' and one label per task "
                        f"(what pyamalgam.data yields), got {type(batch).__name__}"
                        + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else ""))
    missing = [t for t in tasks if t not in batch] + [f"mask (for {t})" for t in tasks
                                                      if t in _NEEDS_MASK and "mask" not in batch][:1]
    if missing:
        raise KeyError(f"the batch has no label for {missing}: the network's tasks are {list(tasks)}, the batch "
                       f"holds {sorted(batch)} (a data set with ground truth for every task, e.g. "
                       f"SyntheticScenes(..., targets=...) for edges / key-points)")


@torch.no_grad()
def teacher_kd(teachers: Mapping, image) -> dict:
    """Each frozen single-task teacher's distillation side (class / depth-bin logits, normals...)."""
    from ..models.multitask import head_outputs

    out = {}
    for task, net in teachers.items():
        head = getattr(net, "head", None)
        if isinstance(head, nn.Module) and hasattr(net, "forward_until"):
            features, _ = net.forward_until(image, net.num_blocks)
            out[task] = head_outputs(head, features)[1]
        else:
            out[task] = net(image)
    return out
