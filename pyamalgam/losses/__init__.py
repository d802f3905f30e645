"""Task losses (Eq. 1, 3, 4), the task objects teachers declare, Eq. 5's feature loss, and the
distillation losses of thesis 003 (Eqs. 3.1, 3.2, 3.4, 4.2-4.4), and its temporal terms (Eqs. 5.1, 5.2, MF)."""
from . import distillation as _distillation
from . import tasks as _tasks
from . import temporal as _temporal
from .distillation import *  # noqa: F401,F403  (the names in distillation.__all__)
from .feature import feature_loss
from .holistic import HolisticDistillation, gradient_penalty, wasserstein_critic_loss
from .tasks import *  # noqa: F401,F403  (the names in tasks.__all__)
from .temporal import *  # noqa: F401,F403  (the names in temporal.__all__)

__all__ = [*_tasks.__all__, "feature_loss", *_distillation.__all__]
__all__ += ["HolisticDistillation", "gradient_penalty", "wasserstein_critic_loss"]
__all__ += _temporal.__all__
