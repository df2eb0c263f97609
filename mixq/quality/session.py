"""A loaded model for quality measurements: token windows of a text, logits per window,
and (for the exact estimator) the decoder-layer inputs of a pass, so a pass that changes
only layer L resumes there instead of recomputing layers 0..L-1."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.engine.model_runner import SeqChunk
from mixq.errors import MixqError


def text_windows(tokenizer, text: str, window: int, max_tokens: int, what: str = "the text",
                 skip: int = 0) -> list[list[int]]:
    """max_tokens tokens of `text`, after its first `skip`, in non-overlapping windows of
    `window` tokens (the last may be shorter; each window's first token is context only). A
    text shorter than one window is refused: its numbers would not be comparable."""
    if window < 2:
        raise MixqError(f"--window must be >= 2, got {window}")
    if max_tokens < 2:
        raise MixqError(f"--max-tokens must be >= 2, got {max_tokens}")
    ids = tokenizer.encode(text, verbose=False)[skip : skip + max_tokens]  # no "longer than the model" warning
    if len(ids) < window:
        after = f" after its first {skip}" if skip else ""
        raise MixqError(f"{what} has {len(ids)} tokens{after} (at most --max-tokens {max_tokens}), fewer than one "
                        f"--window of {window}; give a longer text or a smaller --window")
    return [ids[s : s + window] for s in range(0, len(ids), window) if len(ids[s : s + window]) >= 2]


@dataclass
class LayerStates:
    """The inputs (x, residual) of every decoder layer for one window, and its batch."""

    ids: torch.Tensor
    batch: object
    states: list[tuple[torch.Tensor, torch.Tensor | None]]


class Session:
    """An engine's model scored one window (one sequence) at a time."""

    def __init__(self, engine):
        self.engine = engine
        self.model = engine.model
        self.runner = engine.runner
        self.blocks: list[int] = []

    @classmethod
    def load(cls, model_path: str | None, config: str | None, device: str, dtype: str, window: int,
             kv_cache_dtype: str = "auto") -> Session:
        from mixq.engine.engine import LLM
        from mixq.engine.engine_config import resolve_device

        if dtype == "auto" and resolve_device(device).type == "cpu":
            # scores are compared at the 1e-5 level (KLD against the base): float32 on the CPU,
            # not the engine's speed default (bf16 where the CPU has it)
            dtype = "float32"
        llm = LLM(model_path=model_path, mixed_precision_config=config, device=device, dtype=dtype,
                  kv_cache_dtype=kv_cache_dtype, max_total_tokens=window + 64, max_running_requests=1, disable_cuda_graph=True,
                  merge_projections=False)  # measure hooks and swaps single projections
        return cls(llm.engine)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _blocks(self, n: int) -> list[int]:
        need = -(-n // self.runner.block_size)
        if need > self.runner.num_blocks:
            raise MixqError(f"the KV cache ({self.runner.num_blocks} blocks) cannot hold a {n}-token window")
        return list(range(need))

    def logits(self, ids: list[int]) -> torch.Tensor:
        """[T, vocab] float32 logits at every position of one window."""
        return self.runner.score(ids, self._blocks(len(ids)))

    @torch.inference_mode()
    def capture(self, ids: list[int]) -> tuple[LayerStates, torch.Tensor]:
        """Run one window, keeping each decoder layer's input; (states, logits [T, V])."""
        t, batch = self.runner.prepare([SeqChunk(ids, 0, self._blocks(len(ids)))])
        m = self.model.model
        x, residual = m.embed_tokens(t), None
        states = []
        for layer in m.layers:
            states.append((x, residual))
            x, residual = layer(x, residual, batch)
        x, _ = m.norm(x, residual)
        return LayerStates(t, batch, states), self.model.compute_logits(x).float()

    @torch.inference_mode()
    def resume(self, st: LayerStates, layer: int) -> torch.Tensor:
        """Logits [T, V] of the window recomputed from decoder layer `layer` on (its earlier
        layers unchanged since `capture`)."""
        m = self.model.model
        x, residual = st.states[layer]
        for lyr in m.layers[layer:]:
            x, residual = lyr(x, residual, st.batch)
        x, _ = m.norm(x, residual)
        return self.model.compute_logits(x).float()

    def close(self) -> None:
        self.engine.close()
