"""One registry style for every extension point: generation backends, validator tiers, services.

A name resolves, in this order, to:

1. a built-in, from the table below (``module:attr`` strings, imported on first use, so optional
   extras stay optional and nothing depends on the installed package metadata being current);
2. an entry point of the registry's group (``autointerv.backends``, ``autointerv.tiers``,
   ``autointerv.services``) in any installed package: a plug-in;
3. a ``module:attr`` reference itself (``examples.echo_backend:EchoBackend``): a class that is
   importable but not packaged, e.g. for ``autointerv service --app module:obj`` or a config's
   ``backend:`` / ``kind:`` field.

Backend and tier classes carry their own pydantic settings model (``config_model``, a subclass of
:class:`services.core.config.BackendConfig` / :class:`services.core.config.BaseTierConfig`); the
typed config validates a plug-in's section with it, so a typo in a plug-in's field fails at
start-up naming the field, like a built-in's.

Examples::

    >>> BACKENDS.target("sim")
    'services.generator.backends.sim:SimBackend'
    >>> BACKENDS.target("examples.echo_backend:EchoBackend")
    'examples.echo_backend:EchoBackend'
    >>> BACKENDS.target("gpt5") is None
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType
from typing import Any


class UnknownExtension(LookupError):
    """A name that is neither built in, nor an entry point, nor an importable ``module:attr``."""


@dataclass(frozen=True)
class Registry:
    """Named classes of one kind of extension (see the module docstring for the lookup order)."""

    group: str  # entry-point group
    kind: str  # what one is called in messages ("generation backend")
    builtin: Mapping[str, str]  # name -> "module:attr"

    def plugins(self) -> dict[str, EntryPoint]:
        """Entry points of the group whose names are not built in (a built-in name always means the
        built-in: stale metadata of an old install cannot shadow it)."""
        return {ep.name: ep for ep in entry_points(group=self.group) if ep.name not in self.builtin}

    def names(self) -> list[str]:
        """Built-in names, then plug-ins' (sorted)."""
        return [*self.builtin, *sorted(self.plugins())]

    def target(self, name: str) -> str | None:
        """The ``module:attr`` a name stands for; None when it stands for nothing."""
        if name in self.builtin:
            return self.builtin[name]
        ep = self.plugins().get(name)
        if ep is not None:
            return ep.value
        module, sep, attr = name.partition(":")
        return name if sep and module and attr else None

    def load(self, name: str) -> Any:
        """The object ``name`` stands for; UnknownExtension saying why when there is none."""
        target = self.target(name)
        if target is None:
            raise UnknownExtension(f"{name!r} is not a known {self.kind}: built in are {', '.join(self.builtin)}; "
                                   f"a plug-in registers under the {self.group!r} entry-point group, or name one "
                                   "as module:Class")
        module, _, attr = target.partition(":")
        try:
            obj: Any = import_module(module)
        except ImportError as exc:
            raise UnknownExtension(f"{self.kind} {name!r}: cannot import {module!r} ({exc})") from exc
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise UnknownExtension(f"{self.kind} {name!r}: {module!r} has no {attr!r}") from None
        return obj


BACKENDS = Registry("autointerv.backends", "generation backend", MappingProxyType({
    "sim": "services.generator.backends.sim:SimBackend",
    "replay": "services.generator.backends.replay:ReplayBackend",
    "transformers": "services.generator.backends.transformers_backend:TransformersBackend",
    "vllm": "services.generator.backends.vllm_backend:VLLMBackend",
    "openai": "services.generator.backends.openai_backend:OpenAIBackend",
}))

TIERS = Registry("autointerv.tiers", "validator tier", MappingProxyType({
    "keyword": "services.validator.tiers:KeywordTier",
    "embedding": "services.validator.tiers:EmbeddingTier",
    "llm": "services.validator.tiers:LLMTier",
    "generative": "services.validator.generative:GenerativeTier",
}))

SERVICES = Registry("autointerv.services", "service", MappingProxyType({
    "controller": "services.controller:ControllerService",
    "generator": "services.generator:GeneratorService",
    "embedder": "services.embedder:EmbedderService",
    "clusterer": "services.clusterer:ClustererService",
    "hypothesizer": "services.hypothesizer:HypothesizerService",
    "validator": "services.validator:ValidatorService",
    "sink": "services.sink:SinkService",
}))
