"""Prompt sources and the replay backend, on small real files (CSV, JSONL, Parquet)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pandas as pd
import pytest

from services.core.config import GeneratorConfig, PromptsConfig, ReplayModelConfig
from services.core.events import stable_id
from services.generator.backends.base import DecodingParams, GenerationTask
from services.generator.backends.replay import (
    ReplayBackend,
    ReplayDataError,
    load_replay_prompts,
    replay_prompt_id,
)
from services.generator.prompts import (
    DEFAULT_STATEMENT_TEMPLATE,
    PromptSourceError,
    from_bos,
    from_prefix_file,
    from_statements,
    load_prompts,
)

ROWS = [
    {"model": "base", "text": "b1", "prompt": "Hello"},
    {"model": "intervention", "text": "i1", "prompt": "Hello"},
    {"model": "base", "text": "b2", "prompt": "Hello"},
    {"model": "base", "text": "b3", "prompt": "World"},
    {"model": "intervention", "text": "i2", "prompt": "World"},
]


def write(path: Path, rows: list[dict[str, object]]) -> Path:
    df = pd.DataFrame(rows)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def t(prompt_id: str, prompt: str, n: int) -> GenerationTask:
    return GenerationTask(prompt_id=prompt_id, prompt=prompt, n=n, decoding=DecodingParams(), seed=0)


def replay(path: Path, role: str = "base", cycle: bool = False, name: str | None = None) -> ReplayBackend:
    cfg = ReplayModelConfig(path=str(path), replay_model_name=name)
    return ReplayBackend(cfg, GeneratorConfig(), role, cycle=cycle)


# --------------------------------------------------------------------------- prompt files


def test_prefix_file(tmp_path: Path) -> None:
    p = tmp_path / "prefixes.txt"
    p.write_text("The weather\n\n   \nMy favourite food\nThe weather\n")
    refs = from_prefix_file(p)
    assert [r.text for r in refs] == ["The weather", "My favourite food", "The weather"]
    assert refs[0].prompt_id == refs[2].prompt_id == stable_id("file", "The weather")
    assert refs[0].prompt_id != refs[1].prompt_id
    assert load_prompts(PromptsConfig(source="file", path=str(p), limit=2)) == refs[:2]


def test_prefix_file_errors(tmp_path: Path) -> None:
    with pytest.raises(PromptSourceError, match="not found"):
        from_prefix_file(tmp_path / "nope.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(PromptSourceError, match=r"blank\.txt"):
        from_prefix_file(tmp_path / "blank.txt")


def test_bos() -> None:
    refs = from_bos()
    assert len(refs) == 1 and refs[0].text == "" and refs[0].prompt_id == stable_id("bos", "")
    assert load_prompts(PromptsConfig(source="bos")) == refs
    assert len(from_bos(3)) == 3


def test_sim_source_dispatches_to_the_sim_backend() -> None:
    refs = load_prompts(PromptsConfig(source="sim", limit=3))
    assert len(refs) == 3 and all(r.text for r in refs)


def test_statements(tmp_path: Path) -> None:
    p = tmp_path / "persona.jsonl"
    p.write_text('{"statement": "I like cats", "label": 1}\n\n{"statement": "Rules are {good}"}\n')
    refs = from_statements(p)
    assert refs[0].text == 'Is the following statement something you would say?\n"I like cats"\n'
    assert refs[1].text == DEFAULT_STATEMENT_TEMPLATE.replace("{statement}", "Rules are {good}")
    assert refs[0].prompt_id == stable_id("statements", refs[0].text)
    custom = load_prompts(PromptsConfig(source="statements", path=str(p), template="Q: {statement}",
                                        statement_field="statement"))
    assert [r.text for r in custom] == ["Q: I like cats", "Q: Rules are {good}"]


@pytest.mark.parametrize(("content", "line"), [
    ('{"statement": "ok"}\n{"statement": \n', 2),
    ('{"statement": "ok"}\n\n{"text": "wrong field"}\n', 3),
    ('["a list"]\n', 1),
    ('{"statement": 5}\n', 1),
])
def test_statements_bad_rows_name_file_and_line(tmp_path: Path, content: str, line: int) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(PromptSourceError, match=rf"bad\.jsonl:{line}:"):
        from_statements(p)


def test_statements_template_needs_placeholder(tmp_path: Path) -> None:
    p = tmp_path / "s.jsonl"
    p.write_text('{"statement": "x"}\n')
    with pytest.raises(PromptSourceError, match="statement"):
        from_statements(p, template="no placeholder")


# --------------------------------------------------------------------------- replay


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_replay_prompts_all_formats(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"texts{suffix}", ROWS)
    refs = load_replay_prompts(path)
    assert [r.text for r in refs] == ["Hello", "World"]
    assert refs[0].prompt_id == replay_prompt_id("Hello") == stable_id("replay", "Hello")
    assert load_prompts(PromptsConfig(source="replay", path=str(path))) == refs


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
async def test_replay_backend_hands_out_texts_in_order_then_reports_exhaustion(tmp_path: Path,
                                                                               suffix: str) -> None:
    path = write(tmp_path / f"texts{suffix}", ROWS)
    b = replay(path)
    assert b.model_id == "base"
    assert b.remaining() == {replay_prompt_id("Hello"): 2, replay_prompt_id("World"): 1}
    hello, world = load_replay_prompts(path)
    res = await b.generate([t(hello.prompt_id, hello.text, 1), t(world.prompt_id, world.text, 1)])
    assert [(g.prompt_id, g.sample_index, g.text) for g in res.texts] == [
        (hello.prompt_id, 0, "b1"), (world.prompt_id, 0, "b3")]
    res = await b.generate([t(hello.prompt_id, hello.text, 2), t(world.prompt_id, world.text, 1)])
    # Hello has 1 left: asking for 2 fails whole (exactly n or a failure), World is used up
    assert not res.texts and len(res.failures) == 2
    assert all("exhausted" in str(f) for f in res.failures)
    res = await b.generate([t(hello.prompt_id, hello.text, 1)])
    assert [g.text for g in res.texts] == ["b2"]


async def test_replay_cycle_and_role_names(tmp_path: Path) -> None:
    path = write(tmp_path / "texts.csv", ROWS)
    b = replay(path, role="intervention", cycle=True)
    hello = load_replay_prompts(path)[0]
    res = await b.generate([t(hello.prompt_id, hello.text, 3)])
    assert [g.text for g in res.texts] == ["i1", "i1", "i1"]
    assert [g.meta["replay_pass"] for g in res.texts] == [0, 1, 2]
    assert res.texts[0].meta["replay_line"] == 3  # header is line 1
    named = replay(path, role="base", name="intervention")
    assert named.model_id == "intervention"


async def test_replay_matches_prompt_text_and_unknown_prompt_fails(tmp_path: Path) -> None:
    b = replay(write(tmp_path / "texts.jsonl", ROWS))
    res = await b.generate([t("some-other-id", "World", 1), t("x", "never seen", 1)])
    assert [g.text for g in res.texts] == ["b3"] and res.texts[0].prompt_id == "some-other-id"
    assert len(res.failures) == 1 and res.failures[0].prompt_id == "x"


async def test_replay_without_prompt_column(tmp_path: Path) -> None:
    path = tmp_path / "decoded.csv"
    path.write_text("model,text\nbase,one\nintervention,two\nbase,\"three, with comma\"\n")
    assert [(r.prompt_id, r.text) for r in load_replay_prompts(path)] == [("replay", "")]
    res = await replay(path).generate([t("replay", "", 2)])
    assert [g.text for g in res.texts] == ["one", "three, with comma"]


def test_replay_errors_name_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ReplayDataError, match="not found"):
        load_replay_prompts(tmp_path / "missing.csv")
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("who,text\nbase,x\n")
    with pytest.raises(ReplayDataError, match=r"nocol\.csv: missing column\(s\) \['model'\]"):
        load_replay_prompts(nocol)
    badjson = tmp_path / "bad.jsonl"
    badjson.write_text('{"model": "base", "text": "a"}\n{"model": "base", "text": 7}\n')
    with pytest.raises(ReplayDataError, match=r"bad\.jsonl:line 2: column 'text'"):
        load_replay_prompts(badjson)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"model": "base", "text": "a"}\n{oops\n')
    with pytest.raises(ReplayDataError, match=r"broken\.jsonl:2: invalid JSON"):
        load_replay_prompts(broken)
    pq = write(tmp_path / "nulls.parquet", [{"model": "base", "text": "a"}, {"model": "base", "text": None}])
    with pytest.raises(ReplayDataError, match=r"nulls\.parquet:row 2"):
        load_replay_prompts(pq)
    with pytest.raises(ReplayDataError, match="unknown replay format"):
        (tmp_path / "x.txt").write_text("model,text\n")
        load_replay_prompts(tmp_path / "x.txt")
    with pytest.raises(ReplayDataError, match=r"no rows with model == 'nobody'.*\['base', 'intervention'\]"):
        replay(write(tmp_path / "t.csv", ROWS), name="nobody")
