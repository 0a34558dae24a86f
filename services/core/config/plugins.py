"""Plug-in sections of the typed config: a discriminated union whose members are the built-in
settings models plus, for any other name, the settings model the registry's class carries.

``models.base`` is ``{backend: sim, ...}``, ``{backend: vllm, ...}`` or ``{backend: my_pkg:MyBackend,
...}``: pydantic picks the built-in member by ``backend`` (a tagged union), and
:func:`plugin_member` validates any other name against its class's ``config_model``.  Errors name
the field either way (``models.base.gpu_memory_utilization``, ``models.base.backend``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError, ValidatorFunctionWrapHandler
from pydantic_core import InitErrorDetails, PydanticCustomError

from services.core.registry import Registry, UnknownExtension

PLUGIN_TAG = "plug-in"  # the union member that holds a plug-in's own settings model


def field_value(value: Any, field: str, default: str | None) -> str | None:
    """``value[field]`` of a mapping or an already-built settings model."""
    got = value.get(field, default) if isinstance(value, Mapping) else getattr(value, field, default)
    return None if got is None else str(got)


def tagger(field: str, default: str | None, builtin: Mapping[str, type[BaseModel]]) -> Callable[[Any], str | None]:
    """The union's discriminator: a built-in's own name, else :data:`PLUGIN_TAG`."""

    def tag(value: Any) -> str | None:
        name = field_value(value, field, default)
        if name is None:
            return None
        return name if name in builtin else PLUGIN_TAG

    return tag


def _error(field: str, kind: str, message: str, name: Any) -> ValidationError:
    return ValidationError.from_exception_data(kind, [InitErrorDetails(
        type=PydanticCustomError(f"unknown_{kind.replace(' ', '_')}", message), loc=(field,), input=name)])


def plugin_member(registry: Registry, field: str, default: str | None,
                  builtin: Mapping[str, type[BaseModel]]) -> Callable[[Any, ValidatorFunctionWrapHandler], Any]:
    """A wrap validator: built-in names go to pydantic's tagged union; any other name is looked up in
    ``registry`` and validated by its class's ``config_model`` (errors relocated under the field)."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        name = field_value(value, field, default)
        if name is None or name in builtin:
            return handler(value)  # a missing field is reported by the union, naming it
        try:
            cls = registry.load(name)
        except UnknownExtension as exc:
            raise _error(field, registry.kind, str(exc), name) from None
        model = getattr(cls, "config_model", None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise _error(field, registry.kind, f"{registry.kind} {name!r} has no pydantic config_model", name)
        if isinstance(value, model):
            return value
        data = value.model_dump() if isinstance(value, BaseModel) else value
        return model.model_validate(data)

    return validate
