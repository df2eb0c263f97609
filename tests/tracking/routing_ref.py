"""Independent references for expert routing: the top-k is recomputed here (float64 sort of
router logits) from either the router logits mixq's MoE layers produced (a forward hook on
the router Linear), or from the hidden states HF transformers feeds its MoE blocks and the
checkpoint's router weights. Nothing of mixq's routing function or tracker is used."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from mixq.layers.moe import SparseMoE

FIX = Path(__file__).parents[1] / "fixtures"
FIXTURE = {"qwen3-moe": FIX / "tiny-qwen3-moe" / "bf16", "mixtral": FIX / "tiny-mixtral" / "bf16"}
GATE = {"qwen3-moe": "model.layers.{}.mlp.gate.weight", "mixtral": "model.layers.{}.block_sparse_moe.gate.weight"}


def topk_of_logits(logits: torch.Tensor, k: int, min_rel_gap: float) -> torch.Tensor:
    """[T, E] logits -> [T, k] expert ids, slot 0 the largest. Softmax/sigmoid scoring is
    monotone, so the logits' order is the routing. Asserts each of the k+1 leading logits is
    `min_rel_gap` (relative to the token's largest |logit|) above the next, so rounding in
    the implementation under test cannot reorder them."""
    top = logits.double().sort(dim=-1, descending=True)
    gaps = (top.values[:, :k] - top.values[:, 1 : k + 1]).min(-1).values
    scale = logits.double().abs().max(-1).values
    worst = (gaps / scale).min()
    assert worst > min_rel_gap, f"near-tie in the router ({worst:.2e} relative): this test input is fragile"
    return top.indices[:, :k]


def slot_counts(routes: list[torch.Tensor], num_experts: int) -> torch.Tensor:
    """Per layer [T, k] ids -> [L, k, E] counts, by a plain loop."""
    k = routes[0].shape[1]
    out = torch.zeros(len(routes), k, num_experts, dtype=torch.int64)
    for r, ids in enumerate(routes):
        for t in range(ids.shape[0]):
            for s in range(k):
                out[r, s, int(ids[t, s])] += 1
    return out


@contextlib.contextmanager
def router_logits(model: torch.nn.Module):
    """Collect the router logits of every forward: yields a list with one entry per forward,
    {layer id: [T, E] float32 logits on the CPU}."""
    passes: list[dict[int, torch.Tensor]] = []
    moes = [(int(re.search(r"layers\.(\d+)\.", n).group(1)), m) for n, m in model.named_modules()
            if isinstance(m, SparseMoE)]
    first = min(lid for lid, _ in moes)

    def hook(lid):
        def fn(mod, args, out):
            if lid == first:
                passes.append({})
            passes[-1][lid] = out.detach().float().cpu()
        return fn

    handles = [m.gate.register_forward_hook(hook(lid)) for lid, m in moes]
    try:
        yield passes
    finally:
        for h in handles:
            h.remove()


class HFRouter:
    """Routing of a checkpoint from the inputs of HF transformers' MoE blocks."""

    def __init__(self, family: str, path: Path):
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        cfg = self.hf.config
        self.top_k = cfg.num_experts_per_tok
        self.num_experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
        w = load_file(str(Path(path) / "model.safetensors"))
        self.layers = [i for i in range(cfg.num_hidden_layers) if GATE[family].format(i) in w]
        self.gates = {i: w[GATE[family].format(i)].double() for i in self.layers}

    @torch.no_grad()
    def route(self, ids: list[int], min_rel_gap: float = 1e-4) -> list[torch.Tensor]:
        """Per MoE layer, [T, k] expert ids for each position of `ids`. The margin is wider
        than for mixq's own logits: HF's hidden states and mixq's differ by float32
        rounding of two implementations (~1e-6 relative)."""
        inputs: dict[int, torch.Tensor] = {}
        hooks = [self.hf.model.layers[i].mlp.register_forward_pre_hook(
            lambda m, args, i=i: inputs.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))) for i in self.layers]
        try:
            self.hf(torch.tensor([ids]))
        finally:
            for h in hooks:
                h.remove()
        return [topk_of_logits(inputs[i].double() @ self.gates[i].T, self.top_k, min_rel_gap) for i in self.layers]
