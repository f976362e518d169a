"""The base of every config model, and the registry decorator of config-owning plugins."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: ``json_schema_extra`` of a field added after outputs were keyed with its model: it enters a
#: cache key (``key_dump``) only when set to something other than its default, so those outputs stay valid
KEYED_WHEN_SET: dict[str, Any] = {"keyed_when_set": True}


def key_dump(model: BaseModel) -> dict[str, Any]:
    """``model_dump(mode="json")`` for a cache key: ``KEYED_WHEN_SET`` fields at their default left out."""
    data = model.model_dump(mode="json")
    for name, info in type(model).model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("keyed_when_set") and getattr(model, name) == info.default:
            data.pop(name)
    return data


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
