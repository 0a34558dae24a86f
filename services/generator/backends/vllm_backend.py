"""In-process vLLM engine: continuous batching and prefix caching on one GPU.

vLLM is an optional extra (``pip install 'autointerv[vllm]'``); it is imported only here, when
the backend is built.  Seeds: each task's ``SamplingParams(seed=task.seed, n=task.n)`` makes its
``n`` samples reproducible independently of what else is in the engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from services.core.config import GeneratorConfig, VLLMModelConfig

from .base import BatchResult, Generated, GenerationBackend, GenerationError, GenerationTask

log = logging.getLogger("autointerv.generator.vllm")

# vLLM's quantization names for our config values.  vLLM quantizes bitsandbytes in flight only in
# 4 bits; "8bit" maps to in-flight FP8 weights (Ada/Hopper GPUs), its native 8-bit path.
_QUANTIZATION = {"none": None, "4bit": "bitsandbytes", "8bit": "fp8"}


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise RuntimeError(
            "the vllm backend needs the vllm package (Linux + CUDA GPU): pip install 'autointerv[vllm]'"
        ) from exc
    return vllm


class VLLMBackend(GenerationBackend):
    name = "vllm"
    config_model = VLLMModelConfig
    supports_logprobs = True

    def __init__(self, model_cfg: VLLMModelConfig, gen_cfg: GeneratorConfig, role: str) -> None:
        self._vllm = import_vllm()
        if not model_cfg.model:
            raise ValueError(f"models.{role}.model: a HF model id or local path is required")
        self.cfg = model_cfg
        self.gen_cfg = gen_cfg
        self.role = role
        self.model_id = model_cfg.model
        self._llm: Any = None
        self._lock = threading.RLock()  # LLM.generate is not re-entrant
        self._warned_ngram = False

    def load(self) -> None:
        """Start the engine (blocking, slow: weights, CUDA graphs); later calls are no-ops."""
        with self._lock:
            if self._llm is None:
                cfg = self.cfg
                self._llm = self._vllm.LLM(
                    model=cfg.model, enable_prefix_caching=True, dtype=cfg.dtype,
                    quantization=_QUANTIZATION[cfg.quantization],
                    gpu_memory_utilization=cfg.gpu_memory_utilization,
                    trust_remote_code=cfg.trust_remote_code, seed=self.gen_cfg.seed)
                log.info("vLLM engine up for %s (role %s)", cfg.model, self.role)

    def _prompt(self, text: str) -> Any:
        """Text prompts; "" decodes from bos (or eos) given as token ids."""
        tok = self._llm.get_tokenizer()
        if text == "":
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            return {"prompt_token_ids": [start]}
        if self.cfg.chat_template:
            return {"prompt": tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)}
        return {"prompt": text}

    def _params(self, task: GenerationTask) -> Any:
        d = task.decoding
        if d.no_repeat_ngram_size and not self._warned_ngram:
            self._warned_ngram = True
            log.warning("vLLM has no no_repeat_ngram_size; ignored (use the transformers backend "
                        "to match the research code's decoding exactly)")
        return self._vllm.SamplingParams(
            n=task.n, seed=task.seed, temperature=d.temperature, top_p=d.top_p,
            top_k=d.top_k if d.top_k > 0 else -1, max_tokens=d.max_new_tokens)

    def generate_sync(self, tasks: list[GenerationTask]) -> BatchResult:
        with self._lock:
            self.load()
            result = BatchResult()
            prompts = [self._prompt(t.prompt) for t in tasks]
            outputs = self._llm.generate(prompts, [self._params(t) for t in tasks], use_tqdm=False)
            eos = self._llm.get_tokenizer().eos_token_id
            for task, out in zip(tasks, outputs, strict=True):
                if len(out.outputs) != task.n:
                    result.failures.append(GenerationError(
                        f"vLLM returned {len(out.outputs)} of {task.n} samples", prompt_id=task.prompt_id))
                    continue
                for i, c in enumerate(out.outputs):
                    ids = list(c.token_ids)
                    n_tok = len(ids) - (1 if ids and ids[-1] == eos else 0)
                    result.texts.append(Generated(task.prompt_id, i, c.text, n_tok,
                                                  {**task.meta, "finish_reason": c.finish_reason}))
            return result

    async def generate(self, tasks: list[GenerationTask]) -> BatchResult:
        return await asyncio.to_thread(self.generate_sync, tasks)

    def sequence_logprobs(self, texts: list[str]) -> list[float]:
        """Sum of token log-probs of each text after the start token, via prompt_logprobs."""
        with self._lock:
            self.load()
            tok = self._llm.get_tokenizer()
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            prompts = [{"prompt_token_ids": [start, *tok(t, add_special_tokens=False)["input_ids"]]}
                       for t in texts]
            params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
            outs = self._llm.generate(prompts, params, use_tqdm=False)
            sums = []
            for p, out in zip(prompts, outs, strict=True):
                ids = p["prompt_token_ids"]
                lps = out.prompt_logprobs or []
                sums.append(float(sum(lps[i][ids[i]].logprob for i in range(1, len(ids)) if lps[i])))
            return sums

    async def aclose(self) -> None:
        with self._lock:
            self._llm = None
