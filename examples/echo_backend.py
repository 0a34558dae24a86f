"""An example generation backend: answers every prompt by echoing it, with its own settings.

Use it without packaging anything, by its import path (the working directory is a checkout)::

    models:
      intervention: {backend: "examples.echo_backend:EchoBackend", suffix: " Indeed!", repeat: 2}

or, in a package, register it under the ``autointerv.backends`` entry-point group
(``echo = "my_pkg.echo_backend:EchoBackend"``) and write ``backend: echo``.  Its fields are checked
at start-up by :class:`EchoSettings` (``models.intervention.sufix: Extra inputs are not permitted``).

Run it: ``python -m examples.echo_backend`` prints a few texts for two prompts.
"""

from __future__ import annotations

import asyncio

from pydantic import Field

from services.core.config import BackendConfig, GeneratorConfig
from services.generator.backends.base import (
    BatchResult,
    DecodingParams,
    Generated,
    GenerationBackend,
    GenerationTask,
)


class EchoSettings(BackendConfig):
    """The echo backend's own fields; ``backend`` and ``model`` come from BackendConfig."""

    suffix: str = ""  # appended to each echoed prompt
    repeat: int = Field(default=1, ge=1)  # times the prompt is echoed in one text


class EchoBackend(GenerationBackend):
    """Deterministic: sample i of a prompt is the prompt ``repeat`` times plus the suffix and i."""

    name = "echo"
    config_model = EchoSettings

    def __init__(self, model_cfg: EchoSettings, gen_cfg: GeneratorConfig, role: str) -> None:
        self.settings = model_cfg
        self.role = role
        self.model_id = model_cfg.model or f"echo-{role}"

    async def generate(self, tasks: list[GenerationTask]) -> BatchResult:
        out = BatchResult()
        for task in tasks:
            for i in range(task.n):
                text = " ".join([task.prompt.strip() or "(empty prompt)"] * self.settings.repeat)
                text = f"{text}{self.settings.suffix} [{i}]"
                out.texts.append(Generated(task.prompt_id, i, text, len(text.split())))
        return out


async def _demo() -> None:
    from services.generator.backends import make_backend

    settings = EchoSettings(backend="examples.echo_backend:EchoBackend", suffix=" Indeed!")
    backend = make_backend(settings, GeneratorConfig(), "intervention")
    tasks = [GenerationTask(f"p{k}", prompt, n=2, decoding=DecodingParams(), seed=0)
             for k, prompt in enumerate(["Tell me about cats.", "What is rain?"])]
    for g in (await backend.generate(tasks)).texts:
        print(g.prompt_id, g.sample_index, g.text)


if __name__ == "__main__":
    asyncio.run(_demo())
