"""What vLLM and SGLang accept from a compressed-tensors checkpoint, checked before writing.

Facts read from their compressed-tensors integration (vLLM 0.34.0,
``vllm/model_executor/layers/quantization/compressed_tensors/``; SGLang 0.5.23,
``sglang/srt/layers/quantization/compressed_tensors/``; see docs/export.md):
- one scheme per MoE layer: both look up only expert 0's gate/up/down and use that
  scheme for every expert ("All MoE projections need to have same quantization scheme"
  when gate/up/down differ; other experts are not checked, so they would load wrong);
- one scheme per fused Linear (q/k/v -> qkv_proj, gate/up -> gate_up_proj), and all of a
  fused Linear's parts ignored or none;
- which schemes run (`_linear_refusal`, `_moe_refusal`).
A refusal names the layer or tensor; MoE layers can be fixed with --uniform-experts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from mixq.export.prepare import census, moe_layers, scheme_label
from mixq.export.schemes import FLOAT, INT, PACK, CtScheme
from mixq.formats.plan import LoadPlan

ENGINES = {"vllm": "vLLM 0.34.0", "sglang": "SGLang 0.5.23"}


@dataclass(frozen=True)
class Refusal:
    """Something `engine` would refuse or load wrongly, at `where` (a layer or tensor)."""

    engine: str
    where: str
    reason: str
    moe_mix: bool = False  # lifted by --uniform-experts

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def _linear_refusal(engine: str, s: CtScheme) -> str | None:
    """Why `engine` cannot run this scheme in a Linear, or None."""
    w, a = s.weights, s.input_activations
    if s.act_order and engine == "vllm":
        return ("act-order (actorder 'group' with weight_g_idx) is rejected by vLLM 0.34 "
                "('group/dynamic activation ordering is no longer supported')")
    if s.format == PACK:
        return None  # WNA16 (Marlin & co.): 4/8-bit, group or channel, with or without zero points
    if s.format == FLOAT:
        if w["strategy"] == "group":
            return "FP8 weights with group scales (FP8 kernels take tensor, channel or block scales)"
        if a is not None and not a["dynamic"] and a["strategy"] != "tensor":
            return f"static {a['strategy']} FP8 activation scales (only per-tensor static scales)"
        if a is None and w["strategy"] == "block" and engine == "sglang":
            return "block FP8 weights without an activation scheme (W8A16 FP8 takes tensor/channel scales)"
        return None
    if s.format == INT:
        if not w["symmetric"]:
            return "asymmetric INT8 weights with INT8 activations (W8A8 weights must be symmetric)"
        if w["strategy"] not in ("tensor", "channel"):
            return f"INT8 W8A8 with {w['strategy']} weight scales (tensor or channel only)"
        return None
    return f"format {s.format!r}"


def _moe_refusal(engine: str, s: CtScheme) -> str | None:
    """Why `engine` cannot run this scheme for a whole MoE layer, or None."""
    if (why := _linear_refusal(engine, s)) is not None:
        return why
    a = s.input_activations
    if s.format == FLOAT and a is None:
        return "FP8 MoE experts without an activation scheme (fused MoE runs FP8 as W8A8 only)"
    if s.format == INT:
        if engine == "sglang":
            return "INT8 W8A8 MoE experts (SGLang 0.5.23 implements them for NPUs only)"
        if not a["dynamic"]:
            return "INT8 MoE experts with static activation scales (dynamic per-token only)"
    return None


def refusals(plan: LoadPlan, schemes: dict[str, CtScheme | None], engine: str) -> list[Refusal]:
    """Everything `engine` would refuse (or load wrongly) in this export."""
    label = ENGINES[engine]
    out: list[Refusal] = []
    experts = moe_layers(plan.tensors)
    in_moe = {n for names in experts.values() for n in names}
    for layer, names in experts.items():
        kinds = {schemes[n] for n in names}
        if len(kinds) > 1:
            out.append(Refusal(engine, layer, f"experts in {len(kinds)} schemes ({census(plan, names, schemes)}); "
                               f"{label} runs one scheme per MoE layer", moe_mix=True))
        elif (s := kinds.pop()) is not None and (why := _moe_refusal(engine, s)) is not None:
            out.append(Refusal(engine, layer, why))
    for group in plan.fusion_groups():
        if group[0] in in_moe:
            continue
        kinds = {schemes[n] for n in group}
        if len(kinds) > 1:
            parts = ", ".join(f"{n.rsplit('.', 2)[-2]}={scheme_label(schemes[n], plan.tensors[n].spec.family)}"
                              for n in group)
            out.append(Refusal(engine, group[0].rsplit(".", 2)[0],
                               f"{parts}: {label} fuses them into one Linear with one scheme"))
    by_reason: dict[str, list[str]] = defaultdict(list)
    for name, s in schemes.items():
        if s is not None and name not in in_moe and (why := _linear_refusal(engine, s)) is not None:
            by_reason[why].append(name)
    for why, names in by_reason.items():
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        out.append(Refusal(engine, f"{names[0]}{more}", why))
    return out
