"""Generation throughput: TransformersBackend micro-batches vs one ``generate`` call per prompt.

The naive baseline is how the research code's slow path decodes: the model stays loaded, but each
prompt gets its own ``model.generate`` call.  Both sides use the same prompts, model, sampling
settings (temperature, top-p, ``no_repeat_ngram_size``) and ``max_new_tokens``.

    .venv/bin/python bench/generation.py                      # tiny random model on CPU (~1 min)
    .venv/bin/python bench/generation.py --model PATH --device cuda --batch-sizes 1,8,32,64,128

The last line is ``batched_vs_naive=<best batched texts/s / naive texts/s>``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.core.config import GeneratorConfig, TransformersModelConfig
from services.generator.backends.base import DecodingParams, GenerationTask
from services.generator.backends.transformers_backend import (
    TransformersBackend,
    build_tiny_random_lm,
)

WORDS = ("the", "a", "my", "our", "this", "that", "cat", "dog", "weather", "city", "river", "music",
         "science", "story", "people", "market", "garden", "morning", "history", "language",
         "computer", "ocean", "mountain", "friend", "teacher", "window", "game")


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """Prefixes of 2-12 words, like a prefix file: varied lengths so left padding matters."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))).capitalize() for _ in range(n)]


def run_batched(backend: TransformersBackend, prompts: list[str], d: DecodingParams,
                batch_size: int) -> tuple[float, int]:
    backend.gen_cfg = GeneratorConfig(batch_size=batch_size)
    tasks = [GenerationTask(f"p{i}", p, 1, d, seed=i) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    res = backend.generate_sync(tasks)
    elapsed = time.perf_counter() - t0
    assert not res.failures and len(res.texts) == len(prompts), res.failures[:1]
    return elapsed, sum(g.n_tokens for g in res.texts)


@torch.inference_mode()
def run_naive(backend: TransformersBackend, prompts: list[str], d: DecodingParams) -> tuple[float, int]:
    """One ``generate`` per prompt with HF's own sampling, as the research code's loop does."""
    model, tok = backend._model, backend.tokenizer
    assert model is not None
    eos = tok.eos_token_id
    tokens = 0
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        torch.manual_seed(i)
        enc = tok(p, return_tensors="pt").to(model.device)
        out = model.generate(**enc, do_sample=True, temperature=d.temperature, top_p=d.top_p,
                             top_k=d.top_k or None, max_new_tokens=d.max_new_tokens,
                             no_repeat_ngram_size=d.no_repeat_ngram_size or None,
                             pad_token_id=tok.pad_token_id)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        tokens += new.index(eos) if eos in new else len(new)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, tokens


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model path/id (default: a tiny random 4-layer, 256-wide model)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--no-repeat-ngram-size", type=int, default=2)  # the research code's default
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a small shared machine more threads spin "
                         "against other processes and the timings become noise)")
    ap.add_argument("--layers", type=int, default=4, help="tiny model only")
    ap.add_argument("--hidden", type=int, default=256, help="tiny model only")
    args = ap.parse_args(argv)
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or str(build_tiny_random_lm(Path(tmp) / "tiny", layers=args.layers,
                                                            hidden=args.hidden))
        cfg = TransformersModelConfig(model=model_path, device=args.device, dtype=args.dtype)
        backend = TransformersBackend(cfg, GeneratorConfig(), "base")
        backend.load()
        d = DecodingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                           no_repeat_ngram_size=args.no_repeat_ngram_size)
        prompts = make_prompts(args.prompts)
        run_batched(backend, prompts[:4], d, 4)  # warm-up: kernels, allocator, tokenizer caches
        run_naive(backend, prompts[:2], d)

        label = "tiny-random" if not args.model else args.model
        print(f"model={label} device={backend.device} dtype={backend.dtype} prompts={len(prompts)} "
              f"max_new_tokens={args.max_new_tokens} threads={torch.get_num_threads()}")
        print(f"{'mode':<8} {'batch':>5} {'seconds':>8} {'tokens':>7} {'texts/s':>9} {'tokens/s':>9}")
        naive_s, naive_tok = run_naive(backend, prompts, d)
        print(f"{'naive':<8} {1:>5} {naive_s:>8.2f} {naive_tok:>7} {len(prompts) / naive_s:>9.1f} "
              f"{naive_tok / naive_s:>9.1f}")
        best = 0.0
        for bs in (int(x) for x in args.batch_sizes.split(",")):
            secs, tok = run_batched(backend, prompts, d, bs)
            best = max(best, len(prompts) / secs)
            print(f"{'batched':<8} {bs:>5} {secs:>8.2f} {tok:>7} {len(prompts) / secs:>9.1f} "
                  f"{tok / secs:>9.1f}")
        print(f"batched_vs_naive={best / (len(prompts) / naive_s):.2f}")


if __name__ == "__main__":
    main()
