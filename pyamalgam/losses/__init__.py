"""Task losses (Eq. 1, 3, 4), the task objects teachers declare, and Eq. 5's feature loss."""
from . import tasks as _tasks
from .feature import feature_loss
from .tasks import *  # noqa: F401,F403  (the names in tasks.__all__)

__all__ = [*_tasks.__all__, "feature_loss"]
