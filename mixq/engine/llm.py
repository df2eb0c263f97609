"""The synchronous API on top of `LLMEngine`: `LLM(...).generate(...)` and `.stream(...)`.
Also importable as `mixq.engine.engine.LLM`."""

from __future__ import annotations

from collections.abc import Iterator

from mixq.engine.detokenizer import fill_final_texts
from mixq.engine.engine import LLMEngine
from mixq.engine.engine_config import EngineConfig
from mixq.engine.outputs import RequestOutput
from mixq.engine.sampling_params import SamplingParams


class LLM:
    """Synchronous API: `LLM(model_path=..., mixed_precision_config=...).generate(...)`;
    `tp_size=N` (and `ep_size`) runs N ranks, this process being rank 0: `close()` (or a
    `with` block) stops the others."""

    def __init__(self, model_path: str | None = None, mixed_precision_config: str | None = None, **kw):
        self.engine = LLMEngine(EngineConfig(model_path=model_path, mixed_precision_config=mixed_precision_config,
                                             **kw))
        self._n = 0

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (batched together); results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = []
        eng, defer = self.engine, self.engine.defer_text
        eng.defer_text = True  # no text per step: one decode per sequence at the end (below)
        try:
            for p, sp in zip(prompts, params):
                rid = f"gen-{self._n}"
                self._n += 1
                eng.add_request(rid, p, sp)
                ids.append(rid)
        finally:
            eng.defer_text = defer
        final: dict[str, RequestOutput] = {}
        while eng.has_unfinished():
            for o in eng.step(finished_only=True):  # nobody reads the updates before the end
                final[o.request_id] = o
        outs = [final[r] for r in ids]
        fill_final_texts(eng.detok, outs, [sp.skip_special_tokens for sp in params])
        return outs

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one request (n = 1) as they are generated."""
        rid = f"stream-{self._n}"
        self._n += 1
        self.engine.add_request(rid, prompt, sampling_params or SamplingParams())
        while self.engine.has_unfinished():
            for o in self.engine.step():
                if o.request_id == rid and o.outputs[0].delta_text:
                    yield o.outputs[0].delta_text
