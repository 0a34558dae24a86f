"""Prompt sources: prefix files, BOS, persona-style statement datasets, replay files, sim topics.

Every source returns ``list[PromptRef]`` whose ``prompt_id`` is ``stable_id(source, text)``, so the
same prompt gets the same id in every process and run.  Errors name the file and line.
"""

from __future__ import annotations

from pathlib import Path

from services.core.config import PromptsConfig, SimConfig
from services.core.events import PromptRef, stable_id
from services.core.jsonl import iter_jsonl_objects

DEFAULT_STATEMENT_TEMPLATE = 'Is the following statement something you would say?\n"{statement}"\n'


class PromptSourceError(ValueError):
    """A prompt file is missing or has a bad row; the message names the file and line."""


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise PromptSourceError(f"prompt file not found: {p}")
    return p


def from_prefix_file(path: str | Path) -> list[PromptRef]:
    """One prefix per line, in file order (the controller cycles them); blank lines skipped.

    Duplicated lines stay, so a file can weight prefixes; they share one prompt_id."""
    p = _existing(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise PromptSourceError(f"{p}: not UTF-8 text: {exc}") from None
    refs = [PromptRef(prompt_id=stable_id("file", line), text=line) for line in lines if line.strip()]
    if not refs:
        raise PromptSourceError(f"{p}: no prompts (the file has only blank lines)")
    return refs


def from_bos(n: int = 1) -> list[PromptRef]:
    """Decoding from BOS: ``n`` copies of the empty prompt (one id; copies only weight a cycle)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [PromptRef(prompt_id=stable_id("bos", ""), text="")] * n


def from_statements(path: str | Path, template: str = DEFAULT_STATEMENT_TEMPLATE,
                    field: str = "statement") -> list[PromptRef]:
    """JSONL statements (e.g. persona datasets), each wrapped in ``template``'s ``{statement}``.

    ``str.replace`` rather than ``str.format`` so that templates may contain other braces."""
    if "{statement}" not in template:
        raise PromptSourceError(f"statement template must contain '{{statement}}': {template!r}")
    p = _existing(path)
    refs = []
    for lineno, obj in iter_jsonl_objects(p, PromptSourceError):
        value = obj.get(field)
        if not isinstance(value, str) or not value.strip():
            raise PromptSourceError(f"{p}:{lineno}: field {field!r} missing or not a non-empty string")
        text = template.replace("{statement}", value.strip())
        refs.append(PromptRef(prompt_id=stable_id("statements", text), text=text))
    if not refs:
        raise PromptSourceError(f"{p}: no statements")
    return refs


def from_replay(path: str | Path) -> list[PromptRef]:
    """The distinct prompts of a replay file (ids match the replay backend's)."""
    from services.generator.backends.replay import ReplayDataError, load_replay_prompts

    try:
        return load_replay_prompts(path)
    except ReplayDataError as exc:
        raise PromptSourceError(str(exc)) from exc


def load_prompts(cfg: PromptsConfig, sim: SimConfig | None = None) -> list[PromptRef]:
    """The configured prompt source, cut to ``cfg.limit`` prompts."""
    if cfg.source == "file":
        refs = from_prefix_file(cfg.path or "")
    elif cfg.source == "bos":
        refs = from_bos()
    elif cfg.source == "statements":
        refs = from_statements(cfg.path or "", cfg.template, cfg.statement_field)
    elif cfg.source == "replay":
        if not cfg.path:
            raise PromptSourceError("prompts.path: the replay prompt source needs the replay file")
        refs = from_replay(cfg.path)
    elif cfg.source == "sim":
        from services.generator.backends.sim import sim_prompts

        refs = sim_prompts(cfg, sim)
    else:  # unreachable while PromptsConfig.source is a Literal; kept for new sources
        raise PromptSourceError(f"unknown prompt source {cfg.source!r}")
    return refs[:cfg.limit] if cfg.limit else refs
