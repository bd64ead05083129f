"""Components that remember the arguments they were built with, so an exported model can be rebuilt."""

from __future__ import annotations

import inspect
from typing import Any


class RecordsInitArgs:
    """Mixin: every instance keeps the arguments of its constructor call, defaults filled in.

    The arguments are captured in ``__new__``, before ``__init__`` runs, so subclasses need no code
    of their own; :func:`lightning_modules.tools.export.export_model` writes them to the exported config
    and :meth:`lightning_modules.tools.export.EmbeddingModel.from_pretrained` calls the class with them.
    Unpickling and ``copy.deepcopy`` call ``__new__`` without arguments; they then restore the
    instance's ``__dict__``, recorded arguments included.
    """

    def __new__(cls, *args: Any, **kwargs: Any):
        instance = super().__new__(cls)
        bound = inspect.signature(cls.__init__).bind_partial(None, *args, **kwargs)
        bound.apply_defaults()
        recorded: dict[str, Any] = {}
        for index, (name, value) in enumerate(bound.arguments.items()):
            kind = bound.signature.parameters[name].kind
            if index == 0 or kind is inspect.Parameter.VAR_POSITIONAL:
                continue  # ``self``; positional-only extras cannot be passed back by name
            if kind is inspect.Parameter.VAR_KEYWORD:
                recorded.update(value)
            else:
                recorded[name] = value
        # Plain attribute: nn.Module.__setattr__ needs state that __init__ has not created yet.
        object.__setattr__(instance, "_init_args", recorded)
        return instance

    @property
    def init_args(self) -> dict[str, Any]:
        """The constructor arguments of this instance, by name, with defaults filled in."""
        return dict(self._init_args)
