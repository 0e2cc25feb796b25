"""Steps of a running job: every forward pass of a torch model is a point where the job can
be stopped, and where an expensive job can let cheap work run first.

Expensive methods (Score-FAM, Score-CAM, Ablation-CAM, L2-CAF, ...) run the model hundreds
of times per image. :func:`watch_steps` puts a forward pre-hook on a served torch module; while
a thread runs a job under :func:`stepping`, each forward pass of that module in that thread
first calls :meth:`StepControl.step`, which

* raises the error :attr:`StepControl.stop_reason` returns (the drain's grace ended, every
  job's deadline passed), so the job stops at its next model pass, and
* calls :attr:`StepControl.between` (the scheduler runs waiting cheap jobs there), but only at
  a clean point: no explainer hook or patched ``forward`` on the module, so cheap work sees
  the plain model (an expensive step inside an explainer's own hook is never interrupted).

Example:
    >>> from torch import nn
    >>> from fam_core.pipeline.errors import Cancelled
    >>> model = watch_steps(nn.Linear(2, 2))
    >>> stop = StepControl(lambda: Cancelled("the grace period ended"))
    >>> with stepping(stop):
    ...     model(torch.zeros(1, 2))
    Traceback (most recent call last):
    ...
    fam_core.pipeline.errors.Cancelled: the grace period ended
    >>> model(torch.zeros(1, 2)).shape  # outside stepping(): no check
    torch.Size([1, 2])
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from fam_core.pipeline.errors import PipelineError

_WATCHED = "_fam_step_hook"
_current = threading.local()


@dataclass
class StepControl:
    """What happens at each step of a job running under :func:`stepping`.

    Attributes:
        stop_reason: returns the error that stops the job, or ``None`` to go on.
        between: runs other work at a clean step (``None``: none).
    """

    stop_reason: Callable[[], PipelineError | None]
    between: Callable[[], None] | None = None

    def step(self, module: nn.Module) -> None:
        """Stop here (raise), or run :attr:`between` when the module is clean."""
        reason = self.stop_reason()
        if reason is not None:
            raise reason
        if self.between is not None and _clean(module):
            with stepping(None), torch.enable_grad():  # as a fresh worker thread runs it
                self.between()
            reason = self.stop_reason()
            if reason is not None:
                raise reason


@contextmanager
def stepping(control: StepControl | None) -> Iterator[None]:
    """Run the block with ``control`` checked at every forward pass of a watched module."""
    previous = getattr(_current, "control", None)
    _current.control = control
    try:
        yield
    finally:
        _current.control = previous


def watch_steps(module: nn.Module) -> nn.Module:
    """Put the step hook on ``module`` (once); returns ``module``."""
    if getattr(module, _WATCHED, None) is None:
        handle = module.register_forward_pre_hook(_step_hook)
        object.__setattr__(module, _WATCHED, handle.id)
    return module


def _step_hook(module: nn.Module, _inputs: object) -> None:
    control: StepControl | None = getattr(_current, "control", None)
    if control is not None:
        control.step(module)


def _clean(module: nn.Module) -> bool:
    """No hook on ``module`` or its layers but the step hook, and no patched ``forward``."""
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return False
    own = getattr(module, _WATCHED, None)
    for layer in module.modules():
        pre_hooks = [key for key in layer._forward_pre_hooks if key != own]
        if pre_hooks or layer._forward_hooks or layer._backward_hooks:
            return False
        if "forward" in layer.__dict__:
            return False
    return True
