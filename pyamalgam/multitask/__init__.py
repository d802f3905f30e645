"""Multi-task learning with labels and self-distillation (seed 002, SD-MTCNN; docs/multitask.md).

- :class:`MultiTaskTrainer` — joint training of a hard-sharing
  :class:`~pyamalgam.models.multitask.MultiTaskNet` on the shared engine, with task weighting
  (equal; uncertainty and DWA as extras), self-distillation (:class:`SelfDistillation`) and
  traditional KD from single-task teachers;
- :func:`register_task` / :class:`TaskSpec` — the task registry (label loss, KD loss, metric);
- :mod:`.table` — seed 002's Table 1 on the synthetic scenes, behind ``pyamalgam mtl``.
"""
from .objectives import SelfDistillation, pool_to, sd_feature_loss
from .tasks import COLUMNS, TaskSpec, known_tasks, register_task, task_spec
from .trainer import LOG_NAME, MultiTaskTrainer
from .weighting import WEIGHTINGS, TaskWeighting

__all__ = ["MultiTaskTrainer", "SelfDistillation", "TaskWeighting", "WEIGHTINGS", "TaskSpec", "register_task",
           "task_spec", "known_tasks", "COLUMNS", "sd_feature_loss", "pool_to", "LOG_NAME"]
