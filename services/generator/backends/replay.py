"""Replay already decoded texts (the research code's ``model,text[,prompt]`` files) as a backend.

Rows whose ``model`` equals ``replay_model_name`` (default: the role) belong to this role.  Each
prompt's texts are handed out in file order, each at most once; when a prompt's texts run out
the task fails with a :class:`GenerationError` saying so (``cycle=True`` wraps around instead,
marking the pass in ``meta``).  Cursors live in this process: two generator replicas replaying
the same file would hand out the same texts, so run replay with one replica per role.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from services.core.config import BackendConfig, GeneratorConfig, ReplayModelConfig
from services.core.events import PromptRef, stable_id
from services.core.jsonl import iter_jsonl_objects

from .base import BatchResult, Generated, GenerationBackend, GenerationError, GenerationTask

NO_PROMPT_ID = "replay"  # prompt_id of every text when the file has no prompt column
REQUIRED_COLUMNS = ("model", "text")


class ReplayDataError(ValueError):
    """A replay file is missing, unreadable or has bad rows; the message names file and line."""


def replay_prompt_id(prompt: str | None) -> str:
    """The id used for a replayed prompt by both the backend and the prompt source."""
    return NO_PROMPT_ID if prompt is None else stable_id("replay", prompt)


def _read_jsonl(path: Path) -> pd.DataFrame:
    return pd.DataFrame([{**obj, "_line": lineno} for lineno, obj in iter_jsonl_objects(path, ReplayDataError)])


def read_replay_table(path: str | Path) -> pd.DataFrame:
    """Load CSV / JSONL / Parquet into a frame with ``model``, ``text``, optional ``prompt`` and
    ``_line`` (the file line, or the row number for Parquet), all validated."""
    p = Path(path)
    if not p.is_file():
        raise ReplayDataError(f"replay file not found: {p}")
    suffix = "".join(p.suffixes[-2:]).lower() if p.suffix.lower() == ".gz" else p.suffix.lower()
    try:
        if suffix in (".csv", ".csv.gz"):
            df = pd.read_csv(p, dtype=str, keep_default_na=False)
            df["_line"] = range(2, len(df) + 2)  # line 1 is the header
        elif suffix in (".jsonl", ".ndjson", ".json"):
            df = _read_jsonl(p)
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(p)
            df["_line"] = range(1, len(df) + 1)
        else:
            raise ReplayDataError(f"{p}: unknown replay format {p.suffix!r} (use .csv, .jsonl or .parquet)")
    except ReplayDataError:
        raise
    except Exception as exc:  # pandas/pyarrow parse errors carry their own line detail
        raise ReplayDataError(f"{p}: cannot read: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        found = [c for c in df.columns if c != "_line"]
        raise ReplayDataError(f"{p}: missing column(s) {missing}; found {found}")
    for col in [*REQUIRED_COLUMNS, *(["prompt"] if "prompt" in df.columns else [])]:
        bad = df[~df[col].map(lambda v: isinstance(v, str))]
        if len(bad):
            row = bad.iloc[0]
            where = "row" if suffix in (".parquet", ".pq") else "line"
            raise ReplayDataError(f"{p}:{where} {row['_line']}: column {col!r} must be a string, "
                                  f"got {row[col]!r}")
    return df


def load_replay_prompts(path: str | Path) -> list[PromptRef]:
    """Distinct prompts of a replay file in first-seen order (all models); one BOS-style prompt
    with id ``"replay"`` when the file has no prompt column."""
    df = read_replay_table(path)
    if "prompt" not in df.columns:
        return [PromptRef(prompt_id=NO_PROMPT_ID, text="")]
    return [PromptRef(prompt_id=replay_prompt_id(t), text=t) for t in dict.fromkeys(df["prompt"])]


def replay_inventory(model_cfg: ReplayModelConfig, role: str) -> dict[str, int]:
    """Texts per prompt id that the replay backend of ``role`` can hand out (the controller plans
    within it, so it never asks for more than the file holds)."""
    if not model_cfg.path:
        raise ValueError(f"models.{role}.path: the replay backend needs a CSV/JSONL/Parquet file")
    df = read_replay_table(model_cfg.path)
    mine = df[df["model"] == (model_cfg.replay_model_name or role)]
    if "prompt" not in df.columns:
        return {NO_PROMPT_ID: len(mine)}
    counts: dict[str, int] = {}
    for prompt in mine["prompt"]:
        pid = replay_prompt_id(prompt)
        counts[pid] = counts.get(pid, 0) + 1
    return counts


def pair_inventory(models: dict[str, BackendConfig]) -> dict[str, int] | None:
    """Pairs available per prompt id: the smaller of the replayed roles' counts (a live role is
    unbounded); None when no role is replayed."""
    counts = [replay_inventory(cfg, role) for role, cfg in models.items() if isinstance(cfg, ReplayModelConfig)]
    if not counts:
        return None
    prompts = set().union(*counts)
    return {p: min(c.get(p, 0) for c in counts) for p in prompts}


@dataclass
class _Pool:
    rows: list[int]  # file lines, for traceability
    texts: list[str]
    cursor: int = 0


class ReplayBackend(GenerationBackend):
    name = "replay"
    config_model = ReplayModelConfig

    def __init__(self, model_cfg: ReplayModelConfig, gen_cfg: GeneratorConfig, role: str, *,
                 cycle: bool = False) -> None:
        if not model_cfg.path:
            raise ValueError(f"models.{role}.path: the replay backend needs a CSV/JSONL/Parquet file")
        self.role = role
        self.path = Path(model_cfg.path)
        self.cycle = cycle
        self.model_id = model_cfg.replay_model_name or role
        df = read_replay_table(self.path)
        mine = df[df["model"] == self.model_id]
        if mine.empty:
            names = sorted(set(df["model"]))[:20]
            raise ReplayDataError(f"{self.path}: no rows with model == {self.model_id!r} for role {role}; "
                                  f"models in the file: {names} (set models.{role}.replay_model_name)")
        self.has_prompts = "prompt" in df.columns
        self._pools: dict[str, _Pool] = {}
        prompts = mine["prompt"] if self.has_prompts else [None] * len(mine)
        for prompt, text, line in zip(prompts, mine["text"], mine["_line"], strict=True):
            pool = self._pools.setdefault(replay_prompt_id(prompt), _Pool([], []))
            pool.rows.append(int(line))
            pool.texts.append(text)

    def remaining(self) -> dict[str, int]:
        """Unused texts per prompt id (for a controller that wants to ask for no more than exists)."""
        return {pid: len(p.texts) - p.cursor for pid, p in self._pools.items()}

    def _pool_for(self, task: GenerationTask) -> _Pool | None:
        if not self.has_prompts:
            return self._pools.get(NO_PROMPT_ID)
        return self._pools.get(task.prompt_id) or self._pools.get(replay_prompt_id(task.prompt))

    def _take(self, task: GenerationTask) -> list[Generated]:
        pool = self._pool_for(task)
        if pool is None:
            raise GenerationError(f"{self.path}: no replay texts of model {self.model_id!r} for prompt "
                                  f"{task.prompt_id} ({task.prompt[:60]!r})", prompt_id=task.prompt_id)
        total = len(pool.texts)
        if not self.cycle and pool.cursor + task.n > total:
            raise GenerationError(f"{self.path}: replay texts of model {self.model_id!r} for prompt "
                                  f"{task.prompt_id} exhausted: asked for {task.n}, "
                                  f"{total - pool.cursor} of {total} left", prompt_id=task.prompt_id,
                                  exhausted=True)
        out = []
        for i in range(task.n):
            k = pool.cursor + i
            meta = {**task.meta, "replay_line": pool.rows[k % total]}
            if self.cycle:
                meta["replay_pass"] = k // total
            out.append(Generated(task.prompt_id, i, pool.texts[k % total], 0, meta))
        pool.cursor += task.n
        return out

    async def generate(self, tasks: list[GenerationTask]) -> BatchResult:
        result = BatchResult()
        for task in tasks:
            try:
                result.texts.extend(self._take(task))
            except GenerationError as exc:
                result.failures.append(exc)
        return result
