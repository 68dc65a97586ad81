"""Mixed-task inference: one batch whose rows belong to different tasks (see :mod:`multitune.tasks.mixed`,
where it lives below the model, whose :meth:`~multitune.model.MultiTaskModel.predict_mixed` runs it)."""

from multitune.tasks.mixed import predict_mixed

__all__ = ["predict_mixed"]
