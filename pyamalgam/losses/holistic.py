"""Holistic distillation, thesis 003 §3.3.1-3.3.2 (Eqs. 3.3-3.4): a conditional WGAN-GP critic.

The critic ``D(Q | I)`` (:class:`pyamalgam.nn.Discriminator`) scores how well a prediction map Q
fits the image I. Eq. 3.3, ``l_ho(S, D) = E[D(Q^s | I)] - E[D(Q^t | I)]``, is minimised by the
critic (high scores for the teacher's maps, low for the student's; its negative is the critic's
estimate of the Wasserstein distance), with the gradient penalty of Gulrajani et al. (the
thesis' [40]) for the Lipschitz constraint; the student maximises ``l^s_ho = E[D(Q^s | I)]``
(Eq. 3.4 subtracts ``lambda_2 l^s_ho``).

This module is the alternating D/S update as a reusable piece. Each training step (§3.3.2 "iterating
the following two steps", critic first)::

    ho = HolisticDistillation(num_classes)           # owns the critic and its Adam optimiser
    s, t = student(img), teacher(img).detach()
    ho.critic_step(s.detach(), t, img)               # `critic_steps` updates of D on this batch
    loss = task + lambda1 * (pi + pa) - lambda2 * ho(s, img)   # = StructuredObjective(holistic=ho)
    loss.backward(); student_optimizer.step()        # ho(s, img) puts no gradient into D

``state_tensors()`` / ``load_state_tensors()`` carry the critic and its optimiser through a
safetensors checkpoint; the penalty draws its interpolation weights from the global RNG of the
maps' device, so a trainer that checkpoints the RNG resumes bit-identically.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from .._checks import check_float, check_int
from ..nn.discriminator import Discriminator, check_critic_inputs

__all__ = ["wasserstein_critic_loss", "gradient_penalty", "HolisticDistillation"]

_OPTIM = "critic_optim."
_CRITIC = "critic."
_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def _scores(name: str, d) -> torch.Tensor:
    if not isinstance(d, torch.Tensor) or not d.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor of critic scores, got "
                        f"{d.dtype if isinstance(d, torch.Tensor) else type(d).__name__}")
    if d.numel() == 0:
        raise ValueError(f"{name} is empty: the mean score of no sample is undefined")
    return d


def wasserstein_critic_loss(d_student: torch.Tensor, d_teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 3.3 as printed: ``l_ho = E[D(Q^s | I)] - E[D(Q^t | I)]``, the means of the critic's
    scores of the student's (fake) and the teacher's (real) maps. The critic minimises it; its
    negative is the critic's Wasserstein estimate (Table 3.6's "score difference")."""
    return _scores("d_student", d_student).mean() - _scores("d_teacher", d_teacher).mean()


def gradient_penalty(critic: Callable, real: torch.Tensor, fake: torch.Tensor, condition: Optional[torch.Tensor],
                     weight: float = 10.0) -> torch.Tensor:
    """WGAN-GP's penalty (Gulrajani et al. 2017, Eq. 3; the thesis' [40]):
    ``weight * E[(||grad_x D(x_hat | I)||_2 - 1)^2]``, ``x_hat = eps * real + (1 - eps) * fake``.

    ``eps ~ U(0, 1)``, one per sample, drawn from the global RNG of the maps' device
    (``torch.rand``). The gradient is taken w.r.t. the interpolated map only (the image is the
    condition, not a sample), and its norm over each sample's map; the penalty is the mean over
    the batch. The graph is kept (``create_graph``), so the penalty trains the critic. Needs a
    per-sample critic (no batch statistics), ``critic(x, condition) -> (B,) or (B, ...)`` scores.
    A zero gradient gives ``weight`` and finite gradients (the norm's subgradient at 0 is 0).
    ``weight=10`` is WGAN-GP's and the public code's lambda.
    """
    weight = check_float("weight", weight)
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be a finite number >= 0, got {weight}")
    for name, t in (("real", real), ("fake", fake)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 1:
            raise TypeError(f"{name} must be a floating-point torch.Tensor with a batch dimension, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if real.shape != fake.shape or real.device != fake.device:
        raise ValueError(f"real and fake must have the same shape and device: real is {tuple(real.shape)} on "
                         f"{real.device}, fake is {tuple(fake.shape)} on {fake.device}")
    if real.shape[0] == 0:
        raise ValueError("real and fake are an empty batch: the penalty's mean over no sample is undefined")
    eps = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), dtype=real.dtype, device=real.device)
    x_hat = eps * real + (1 - eps) * fake
    if not x_hat.requires_grad:  # detached maps (the critic's step): x_hat is the leaf to differentiate
        x_hat.requires_grad_(True)
    scores = critic(x_hat, condition)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    norm = torch.linalg.vector_norm(grad.flatten(1), dim=1)
    return weight * (norm - 1).square().mean()


class HolisticDistillation(nn.Module):
    """The holistic term of Eqs. 3.3-3.4 with its critic and the critic's optimiser (module docstring).

    ``forward(student_map, image)`` is ``l^s_ho``, the critic's mean score of the student's maps
    (the ``holistic=`` hook of :class:`~pyamalgam.losses.StructuredObjective`; gradients reach
    ``student_map`` but never the critic's parameters). ``critic_step`` trains the critic.

    The critic's optimiser is not given by the thesis (the public code uses SGD, lr 4e-4,
    momentum 0.9); the defaults are WGAN-GP's Adam (lr 1e-4, betas (0, 0.9); its Algorithm 1).
    ``critic_steps=1`` is the thesis' alternation (one D step per student step, also the public
    code's; WGAN-GP uses 5) and repeats the step on the same batch.

    Args:
        num_classes: channels of the prediction maps.
        in_chans: channels of the image (0: an unconditional critic).
        critic: a critic of your own, ``critic(map, image) -> (B,) scores`` and per sample; default
            :class:`~pyamalgam.nn.Discriminator` ``(num_classes, in_chans, **critic_options)`` (A2L4).
        lr, betas: the critic's Adam.
        gp_weight: the penalty's lambda (>= 0; 10 in WGAN-GP and the public code).
        critic_steps: critic updates per :meth:`critic_step` call (>= 1).
        critic_options: keywords for the default Discriminator (attention, blocks, width, norm,
            score_map, input_norm).
    """

    def __init__(self, num_classes: int, in_chans: int = 3, *, critic: Optional[nn.Module] = None, lr: float = 1e-4,
                 betas: Tuple[float, float] = (0.0, 0.9), gp_weight: float = 10.0, critic_steps: int = 1,
                 **critic_options):
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        self.in_chans = check_int("in_chans", in_chans, minimum=0)
        if critic is None:
            critic = Discriminator(self.num_classes, self.in_chans, **critic_options)
        elif critic_options:
            raise ValueError(f"options {sorted(critic_options)} build the default Discriminator, but a critic is given")
        elif not isinstance(critic, nn.Module):
            raise TypeError(f"critic must be an nn.Module, got {type(critic).__name__}")
        for attr in ("num_classes", "in_chans"):
            if getattr(critic, attr, getattr(self, attr)) != getattr(self, attr):
                raise ValueError(f"critic has {attr}={getattr(critic, attr)}, HolisticDistillation "
                                 f"{getattr(self, attr)}")
        self.critic = critic
        self.gp_weight = check_float("gp_weight", gp_weight)
        if not math.isfinite(self.gp_weight) or self.gp_weight < 0:
            raise ValueError(f"gp_weight must be a finite number >= 0, got {gp_weight}")
        self.critic_steps = check_int("critic_steps", critic_steps, minimum=1)
        lr = check_float("lr", lr, positive=True)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self._params = list(critic.parameters())
        if not self._params:
            raise ValueError("critic has no parameters to train")
        self.optimizer = torch.optim.Adam(self._params, lr=lr, betas=tuple(float(b) for b in betas))

    # ------------------------------------------------------------------ the terms

    def _check(self, map_name: str, score_map, image) -> None:
        check_critic_inputs(score_map, image, self.num_classes, self.in_chans, map_name)

    def forward(self, student_map: torch.Tensor, image: Optional[torch.Tensor]) -> torch.Tensor:
        """``l^s_ho = E[D(Q^s | I)]`` (§3.3.2), a scalar, differentiable w.r.t. ``student_map``.

        The critic runs with detached copies of its parameters (``torch.func.functional_call``):
        no gradient reaches them, whatever the caller backpropagates. Its parameters change in
        place in :meth:`critic_step`; call that first (a backward through a forward taken before
        the step is refused by autograd's version check rather than silently wrong)."""
        self._check("student_map", student_map, image)
        frozen = {name: p.detach() for name, p in self.critic.named_parameters()}
        frozen.update(dict(self.critic.named_buffers()))
        return functional_call(self.critic, frozen, (student_map, image)).mean()

    def critic_loss(self, student_map: torch.Tensor, teacher_map: torch.Tensor,
                    image: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The critic's objective: Eq. 3.3's ``l_ho`` (as printed: E D(student) - E D(teacher), which
        the critic minimises) plus ``gp_weight`` times the penalty on teacher/student interpolates.
        Returns ``(loss, {"ho": l_ho, "gp": penalty})``. Pass detached maps (critic_step does)."""
        self._check("student_map", student_map, image)
        self._check("teacher_map", teacher_map, image)
        if teacher_map.shape != student_map.shape:
            raise ValueError(f"teacher_map and student_map must have the same shape: teacher_map is "
                             f"{tuple(teacher_map.shape)}, student_map is {tuple(student_map.shape)}")
        ho = wasserstein_critic_loss(self.critic(student_map, image), self.critic(teacher_map, image))
        gp = gradient_penalty(self.critic, teacher_map, student_map, image, self.gp_weight)
        return ho + gp, {"ho": ho, "gp": gp}

    # ------------------------------------------------------------------ the critic's step

    def critic_step(self, student_map: torch.Tensor, teacher_map: torch.Tensor,
                    image: Optional[torch.Tensor]) -> Dict[str, float]:
        """Train the critic on one batch: ``critic_steps`` Adam steps on :meth:`critic_loss`.

        The maps are detached first. A critic with ``update_input_stats`` (the Discriminator)
        first folds the teacher's and the student's maps into its input normalisation. Under
        torch.distributed the gradients are averaged over the ranks before each step, so every
        rank keeps the same critic. A non-finite gradient raises FloatingPointError before any
        step (the same decision on every rank). Returns the last step's values as floats:
        ``loss``, ``wasserstein`` (``-l_ho``, the critic's estimate) and ``gp``."""
        s, t = student_map.detach(), teacher_map.detach()
        image = image.detach() if isinstance(image, torch.Tensor) else image
        self._check("student_map", s, image)
        self._check("teacher_map", t, image)
        update = getattr(self.critic, "update_input_stats", None)
        if callable(update):
            both = None if image is None or self.in_chans == 0 else torch.cat([image, image])
            update(torch.cat([t, s]), both)
        with torch.enable_grad():
            for _ in range(self.critic_steps):
                self.optimizer.zero_grad(set_to_none=True)
                loss, terms = self.critic_loss(s, t, image)
                loss.backward()
                self._average_gradients()
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # free them; forward() never reads them
        return {"loss": float(loss.detach()), "wasserstein": -float(terms["ho"].detach()),
                "gp": float(terms["gp"].detach())}

    def _average_gradients(self) -> None:
        # Every parameter gets a gradient (zeros where unused): the ranks' buffers line up, and
        # Adam keeps state for every parameter (state_tensors' layout does not depend on the data).
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).to(torch.float64) for p in self._params])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            offset = 0
            for p in self._params:
                p.grad.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
        if not bool(torch.isfinite(flat).all()):
            raise FloatingPointError("the critic's gradient is not finite (check the maps and image for inf/NaN, "
                                     "or lower the critic's lr); no step was taken")

    # ------------------------------------------------------------------ checkpoints

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """The critic's weights and buffers (``critic.<name>``), its optimiser's state
        (``critic_optim.state.<i>.<step|exp_avg|exp_avg_sq>``, i = parameter index; absent before
        the first step) and learning rate (``critic_optim.lr``, float64): detached copies."""
        out = {_CRITIC + k: v.detach().clone() for k, v in self.critic.state_dict().items()}
        state = self.optimizer.state_dict()
        for i, entry in state["state"].items():
            for key, value in entry.items():
                out[f"{_OPTIM}state.{i}.{key}"] = torch.as_tensor(value).detach().clone()
        out[_OPTIM + "lr"] = torch.tensor(float(state["param_groups"][0]["lr"]), dtype=torch.float64)
        return out

    def load_state_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors`. Everything is checked before anything changes: a
        missing, unknown or mis-shaped tensor is a ValueError naming it."""
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise TypeError("tensors must be a dict of name -> torch.Tensor (what state_tensors returned)")
        weights = {k[len(_CRITIC):]: v for k, v in tensors.items() if k.startswith(_CRITIC)}
        self._check_weights(weights)
        lr, state = self._parse_optimizer(tensors)
        unknown = sorted(set(tensors) - {_CRITIC + k for k in weights} - {_OPTIM + "lr"}
                         - {f"{_OPTIM}state.{i}.{k}" for i in state for k in state[i]})
        if unknown:
            raise ValueError(f"tensors {unknown[:3]} are not part of this critic's state")
        self.critic.load_state_dict(weights)
        packed = self.optimizer.state_dict()
        packed["param_groups"][0]["lr"] = lr
        packed["state"] = state
        self.optimizer.load_state_dict(packed)

    def _check_weights(self, weights: Dict[str, torch.Tensor]) -> None:
        expected = self.critic.state_dict()
        missing = sorted(set(expected) - set(weights))
        if missing:
            raise ValueError(f"tensor {_CRITIC + missing[0]!r} is missing ({len(missing)} critic tensors in all)")
        extra = sorted(set(weights) - set(expected))
        if extra:
            raise ValueError(f"tensors {[_CRITIC + k for k in extra[:3]]} are not part of this critic's state")
        for k, v in expected.items():
            if tuple(weights[k].shape) != tuple(v.shape) or weights[k].dtype != v.dtype:
                raise ValueError(f"tensor {_CRITIC + k!r} is {weights[k].dtype} {list(weights[k].shape)}, the critic "
                                 f"needs {v.dtype} {list(v.shape)}")

    def _parse_optimizer(self, tensors) -> Tuple[float, dict]:
        if _OPTIM + "lr" not in tensors:
            raise ValueError(f"tensor {_OPTIM + 'lr'!r} is missing")
        lr = tensors[_OPTIM + "lr"]
        if lr.numel() != 1 or not math.isfinite(float(lr)) or float(lr) <= 0:
            raise ValueError(f"tensor {_OPTIM + 'lr'!r} must hold one finite number > 0")
        present = any(k.startswith(_OPTIM + "state.") for k in tensors)
        state = {}
        for i, p in enumerate(self._params) if present else ():
            entry = {}
            for key in _ADAM_STATE:
                name = f"{_OPTIM}state.{i}.{key}"
                if name not in tensors:
                    raise ValueError(f"tensor {name!r} is missing (the optimiser state is all or nothing)")
                shape = () if key == "step" else tuple(p.shape)
                if tuple(tensors[name].shape) != shape:
                    raise ValueError(f"tensor {name!r} has shape {list(tensors[name].shape)}, needs {list(shape)}")
                entry[key] = tensors[name].clone()  # Adam steps "step" in place: not the caller's tensor
            state[i] = entry
        return float(lr), state
