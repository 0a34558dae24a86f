"""Loading the typed config: a YAML file, environment overrides and explicit overrides, validated
at start-up; errors name the field.  Also the resolved config written back as YAML."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Discriminator, Tag, ValidationError

from services.core.config.base import ENV_PREFIX, ConfigError
from services.core.config.root import Config


def set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """``tree[a][b][c] = value`` for path [a, b, c], creating mappings; a ConfigError if one is not."""
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path)}: cannot override inside a non-mapping value")
    node[path[-1]] = value


def parse_value(raw: str, where: str) -> Any:
    """One override value parsed as YAML (``[1, 2]``, ``true``); a ConfigError naming ``where``."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{where}: {raw!r} is not a valid YAML value ({problem}); "
                          "quote it to pass a plain string") from None


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Nested dict from ``AUTOINTERV__A__B=v`` variables plus KAFKA_BOOTSTRAP / REDIS_URL."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX):
            path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
            if path:
                set_path(tree, path, parse_value(raw, f"environment variable {name}") if raw != "" else None)
    if environ.get("KAFKA_BOOTSTRAP"):
        set_path(tree, ["bus", "bootstrap"], environ["KAFKA_BOOTSTRAP"])
    if environ.get("REDIS_URL"):
        set_path(tree, ["cache", "url"], environ["REDIS_URL"])
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _node(annotation: Any) -> Any:
    """What a field's annotation holds, for walking an error's location: a model class, a
    ``{tag: node}`` map for a discriminated union, ``[node]`` for a list, or None."""
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *meta = get_args(annotation)
        if any(isinstance(m, Discriminator) for m in meta):
            return {next(m.tag for m in get_args(member)[1:] if isinstance(m, Tag)): _node(get_args(member)[0])
                    for member in get_args(inner)}
        return _node(inner)
    if origin is list:
        return [_node(get_args(annotation)[0])]
    if origin is Union or (origin is not None and type(None) in get_args(annotation)):
        nodes = [n for n in map(_node, get_args(annotation)) if n is not None]
        return nodes[0] if len(nodes) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def field_path(loc: tuple[int | str, ...], root: type[BaseModel] = Config) -> str:
    """An error location as the config's own path: the union tags pydantic inserts after a
    discriminated field (``models.base.replay.path``) are dropped (``models.base.path``)."""
    parts: list[str] = []
    node: Any = root
    for p in loc:
        if isinstance(node, dict):  # a discriminated union: ``p`` is the member's tag
            if p in node:
                node = node[p]
                continue
            node = None
        parts.append(str(p))
        if isinstance(node, list):
            node = node[0]
        elif isinstance(node, type) and issubclass(node, BaseModel) and p in node.model_fields:
            info = node.model_fields[p]  # pydantic keeps a field's own Annotated[...] extras apart
            node = _node(Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation)
        else:
            node = None
    return ".".join(parts)


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = field_path(e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "invalid config:\n" + "\n".join(lines)


def load_config(path: str | os.PathLike[str] | None = None,
                environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Load YAML, apply env and explicit overrides, validate; raise ConfigError naming fields."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte {exc.start}: "
                              f"{exc.object[exc.start:exc.start + 1]!r})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc.strerror or exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must contain a mapping at the top level (experiment:, "
                              f"models:, ...), not a {type(loaded).__name__}")
        data = loaded
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    try:
        return Config.model_validate(data).resolve_ids()
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


URL_PASSWORD = re.compile(r'(://[^/@:\s"]*:)[^/@\s"]+@')  # the password of scheme://user:password@host


def mask_url(url: str | None) -> str | None:
    """``redis://user:secret@host`` -> ``redis://user:***@host``: a URL's password is a secret."""
    return None if url is None else URL_PASSWORD.sub(r"\1***@", url)


def dump_config(cfg: Config, mask_secrets: bool = False) -> str:
    """The resolved config as YAML; ``mask_secrets`` for copies people read (``autointerv config``,
    a run directory's config.yaml): the cache URL's password is masked, so that copy cannot connect."""
    data = cfg.model_dump(mode="json")
    if mask_secrets:
        data["cache"]["url"] = mask_url(data["cache"]["url"])
    return yaml.safe_dump(data, sort_keys=False)
