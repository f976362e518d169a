"""The base of every config model, and the registry decorator of config-owning plugins."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def registrar(registry: dict[str, Any], tag: str) -> Callable[[type], type]:
    """A class decorator that adds a plugin (a method, a policy) to ``registry`` under its ``name``,
    checking that its ``config`` model declares the same name as the ``Literal`` of field ``tag``."""

    def register(cls: type) -> type:
        declared = cls.config.model_fields[tag].annotation.__args__[0]
        if declared != cls.name:
            raise TypeError(f"{cls.__name__}: config {tag} {declared!r} != {cls.name!r}")
        if registry.get(cls.name, cls) is not cls:
            raise TypeError(f"{cls.name!r} registered twice ({registry[cls.name].__module__}, {cls.__module__})")
        registry[cls.name] = cls
        return cls

    return register
