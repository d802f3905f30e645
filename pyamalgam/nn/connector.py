"""The 1x1 connector of channel-wise distillation (thesis 003, §4.3.2)."""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_int

__all__ = ["Connector"]


class Connector(nn.Module):
    """Maps a student's Cs channels onto a teacher's Ct with a 1x1 convolution (thesis §4.3.2:
    "a 1x1 convolution layer will be employed to upsample the number of channels for the student
    network if the number of channels is different").

    Trained with the student (it is part of the student's side of the loss) and dropped at
    inference. ``Connector(c, c)`` is still a learnt 1x1 convolution; use ``Connector.between(cs,
    ct)`` for "a connector only when the counts differ" (nn.Identity otherwise).

    Args:
        student_channels: Cs. teacher_channels: Ct.
        bias: whether the convolution has a bias (default True, like nn.Conv2d).
    """

    def __init__(self, student_channels: int, teacher_channels: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__()
        self.student_channels = check_int("student_channels", student_channels, minimum=1)
        self.teacher_channels = check_int("teacher_channels", teacher_channels, minimum=1)
        self.conv = nn.Conv2d(self.student_channels, self.teacher_channels, kernel_size=1, bias=bias,
                              device=device, dtype=dtype)

    @classmethod
    def between(cls, student_channels: int, teacher_channels: int, **kwargs) -> nn.Module:
        """A Connector when the channel counts differ, nn.Identity when they agree."""
        if check_int("student_channels", student_channels, minimum=1) == check_int(
                "teacher_channels", teacher_channels, minimum=1):
            return nn.Identity()
        return cls(student_channels, teacher_channels, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.student_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Connector({self.student_channels}, {self.teacher_channels}) expects x of shape "
                             f"(B, {self.student_channels}, H, W), got {got}")
        return self.conv(x)

    def extra_repr(self) -> str:
        return f"{self.student_channels} -> {self.teacher_channels}"
