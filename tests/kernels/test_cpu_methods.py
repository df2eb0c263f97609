"""The CPU methods (torch's int4/int8 CPU kernels, the C FP8 kernel) against the reference
dequantize-then-matmul in float64, on the real fixture checkpoints and on synthetic weights
with the shapes the fixtures lack (N not a multiple of 16, K not a multiple of 32, uneven
act-order groups of a tensor-parallel K shard, zero points on 8-bit weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixq.formats import CheckpointCatalog, writers
from mixq.formats.spec import QuantizedWeight, WeightSpec
from mixq.kernels import cpu_fp8, cpu_gguf
from mixq.kernels.cpu_methods import CPUFP8Method, CPUInt4Method, CPUInt8Method, CPUQ80Method
from mixq.kernels.cpu_quant import fake_quant, round_to_e4m3, token_codes_torch
from mixq.kernels.quant import quant_reference
from mixq.layers.linear import TorchDequantMethod, select_method

FIX = Path(__file__).parents[1] / "fixtures"
CPU = torch.device("cpu")
MS = (1, 3, 17, 70)  # 17 >= cpu_fp8.TILE_MIN_ROWS, 70 >= cpu_methods.TILE_MIN_ROWS: the tile paths
NAMES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")
MOE_NAMES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.1.down_proj.weight")


def names(variant: str) -> tuple[str, str]:
    return MOE_NAMES if "moe" in variant else NAMES


def reference(qw: QuantizedWeight, x: torch.Tensor) -> torch.Tensor:
    """float64 x (after the scheme's activation quantization) @ dequantize(w)^T."""
    return TorchDequantMethod().apply(qw, x.double(), None)


def check(method, qw: QuantizedWeight, gen: torch.Generator, fp32_tol=1e-5, bf16_tol=1.5e-2):
    """fp32 activations: only fp32 rounding separates the kernel from float64 (relative
    Frobenius error 1e-5 leaves ~100x margin). bf16: the input, the scale table and the
    output are rounded to bf16 (2**-9 relative each): 1.5e-2."""
    assert method.can_implement(qw.spec, CPU)[0]
    for dtype, tol in ((torch.float32, fp32_tol), (torch.bfloat16, bf16_tol)):
        held = method.prepare(qw, dtype)
        for m in MS:
            x = torch.randn(m, qw.shape[1], generator=gen).to(dtype)
            y = method.apply(held, x, None)
            assert y.dtype == dtype and y.shape == (m, qw.shape[0])
            ref = reference(qw, x)
            err = float((y.double() - ref).norm() / ref.norm())
            assert err < tol, (qw.name, qw.spec.describe(), dtype, m, err)
    return held


INT4 = ["tiny-llama/gptq-legacy-4bit-asym", "tiny-llama/gptq-legacy-4bit-desc-act", "tiny-llama/gptq-legacy-4bit-g-1",
        "tiny-llama/awq-gemm", "tiny-llama/gptq-w4a16", "tiny-llama/awq-w4a16", "tiny-llama/gptq-w4a16-asym-actorder",
        "tiny-qwen3-moe/gptq-legacy-4bit"]


@pytest.mark.parametrize("variant", INT4)
def test_int4_on_real_checkpoints(variant):
    gen = torch.Generator().manual_seed(0)
    cat = CheckpointCatalog(FIX / variant)
    for name in names(variant):
        qw = cat.read(name)
        assert select_method(qw.spec, CPU, name).name == CPUInt4Method.name
        held = check(CPUInt4Method(), qw, gen)
        # still 4-bit: packed nibbles plus a bf16 scale/zero pair per 32+ columns
        assert held.nbytes < qw.numel * 0.7


def _gptq(w, group, sym, perm=None):
    t = writers.gptq_tensors("m", w, 4, group, sym, perm)
    spec = WeightSpec(layout="gptq", bits=4, dtype=torch.int32, scale_layout="channel" if group == -1 else "group",
                      group_size=None if group == -1 else group, symmetric=sym, act_order=perm is not None,
                      zero_offset=1)
    tensors = {k.removeprefix("m."): v for k, v in t.items()}
    if perm is None:
        tensors.pop("g_idx")
    return QuantizedWeight("m.weight", spec, tuple(w.shape), tensors)


@pytest.mark.parametrize("n,k,group,sym,act_order", [
    (40, 96, 32, False, False),  # N % 16 != 0: padded rows; K = 3 groups of 32
    (24, 200, -1, True, False),  # per channel, K % 32 != 0: K padded with zero columns
    (48, 192, 64, False, True),  # act-order: columns gathered into contiguous groups
    (56, 256, 128, True, True),  # act-order with G = 128 > the padding unit
])
def test_int4_odd_shapes_zero_points_and_act_order(n, k, group, sym, act_order):
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=gen) * 0.05
    perm = torch.randperm(k, generator=gen) if act_order else None
    check(CPUInt4Method(), _gptq(w, group, sym, perm), gen)


def test_int4_act_order_k_shard_has_uneven_groups():
    """A row-parallel shard of an act-order weight keeps the whole scale table, and its
    columns fill the groups unevenly (some not at all): each group is padded on its own."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(32, 256, generator=gen) * 0.05
    full = _gptq(w, 32, False, torch.randperm(256, generator=gen))
    k0, k1 = 64, 160  # rows of qweight pack 8 columns each
    t = dict(full.tensors, qweight=full.tensors["qweight"][k0 // 8 : k1 // 8], g_idx=full.tensors["g_idx"][k0:k1])
    shard = QuantizedWeight("m.weight", full.spec, (32, k1 - k0), t)
    counts = torch.bincount(t["g_idx"].long(), minlength=8)
    assert len(set(counts.tolist())) > 1 and (counts > 0).sum() > 1  # uneven indeed
    held = check(CPUInt4Method(), shard, gen)
    assert "src" in held.tensors


def test_int4_refuses_groups_below_the_kernels():
    spec = WeightSpec(layout="gptq", bits=4, dtype=torch.int32, scale_layout="group", group_size=16)
    ok, why = CPUInt4Method().can_implement(spec, CPU)
    assert not ok and "group size 16 is not a multiple of 32" in why
    assert select_method(spec, CPU).name == TorchDequantMethod.name
    ok, why = CPUInt4Method().can_implement(WeightSpec(layout="gptq", bits=4, dtype=torch.int32), torch.device("cuda"))
    assert not ok and "runs on the CPU" in why


@pytest.mark.parametrize("method,variant", [(CPUInt4Method, "tiny-llama/gptq-w4a16"),
                                            (CPUInt8Method, "tiny-llama/w8a16-int8")])
def test_prepare_refuses_activation_dtypes_without_a_kernel(method, variant):
    qw = CheckpointCatalog(FIX / variant).read(NAMES[0])
    with pytest.raises(ValueError, match=f"{NAMES[0]}: activation dtype torch.float64 is not one of"):
        method().prepare(qw, torch.float64)


@pytest.mark.parametrize("variant", ["tiny-llama/w8a16-int8", "tiny-llama/w8a8-int8", "tiny-qwen3-moe/w8a16-int8"])
def test_int8_on_real_checkpoints(variant):
    gen = torch.Generator().manual_seed(1)
    cat = CheckpointCatalog(FIX / variant)
    for name in names(variant):
        qw = cat.read(name)
        assert select_method(qw.spec, CPU, name).name == CPUInt8Method.name
        check(CPUInt8Method(), qw, gen)


def test_int8_zero_points_per_channel():
    """Asymmetric int8 (compressed-tensors zero points; GPTQ 8-bit per channel): the
    rank-1 correction rowsum(x) * z * s is exact in real numbers."""
    gen = torch.Generator().manual_seed(2)
    n, k = 40, 100
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    zp = torch.randint(-20, 20, (n, 1), generator=gen, dtype=torch.int8)
    spec = WeightSpec(layout="int8", bits=8, dtype=torch.int8, scale_layout="channel", symmetric=False)
    qw = QuantizedWeight("m.weight", spec, (n, k), {"weight": q, "weight_scale": torch.rand(n, 1, generator=gen) * 0.01,
                                                     "weight_zero_point": zp})
    check(CPUInt8Method(), qw, gen)
    w = torch.randn(48, 128, generator=gen) * 0.05
    t = {k2.removeprefix("m."): v for k2, v in writers.gptq_tensors("m", w, 8, -1, False).items()}
    t.pop("g_idx")
    spec8 = WeightSpec(layout="gptq", bits=8, dtype=torch.int32, scale_layout="channel", symmetric=False, zero_offset=1)
    check(CPUInt8Method(), QuantizedWeight("m.weight", spec8, (48, 128), t), gen)


def test_int8_with_group_scales_falls_back_to_the_reference():
    cat = CheckpointCatalog(FIX / "tiny-llama" / "gptq-legacy-8bit")  # 8-bit, groups of 128
    spec = cat.read(NAMES[0]).spec
    ok, why = CPUInt8Method().can_implement(spec, CPU)
    assert not ok and "group scales" in why
    assert select_method(spec, CPU).name == TorchDequantMethod.name


@pytest.mark.parametrize("variant", ["tiny-llama/fp8-dynamic", "tiny-llama/fp8-static", "tiny-llama/fp8-block",
                                     "tiny-llama/fp8-block-deepseek", "tiny-qwen3-moe/fp8-dynamic"])
def test_fp8_on_real_checkpoints(variant):
    """The bf16 tolerance is wider: x rounded to bf16 before its FP8 quantization moves a
    few codes by one e4m3 step (2**-4 relative) against the float64 reference."""
    gen = torch.Generator().manual_seed(4)
    cat = CheckpointCatalog(FIX / variant)
    for name in names(variant):
        qw = cat.read(name)
        assert select_method(qw.spec, CPU, name).name == CPUFP8Method.name
        held = check(CPUFP8Method(), qw, gen, bf16_tol=5e-2 if qw.spec.activation != "none" else 1.5e-2)
        assert held.tensors["weight"].dtype == torch.float8_e4m3fn  # still FP8 in memory


@pytest.mark.parametrize("n,k,block", [(33, 70, (1, 70)), (200, 384, (128, 128)), (48, 96, (1, 32))])
def test_fp8_kernel_odd_shapes_every_code_and_both_paths(n, k, block):
    """Every e4m3 byte (subnormals, -0, 448) decodes exactly; K tails shorter than the
    16-lane vectors, partial scale blocks, the GEMV rows 1-4 and the tile path."""
    gen = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8)
    codes[codes & 0x7F == 0x7F] = 0x7E  # drop NaN codes
    codes.view(-1)[:254] = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    w = codes.view(torch.float8_e4m3fn)
    bn, bk = block
    scale = torch.rand(-(-n // bn), -(-k // bk), generator=gen) + 0.5
    dense = w.double() * scale.double().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    for m in (1, 2, 3, 4, 5, cpu_fp8.TILE_MIN_ROWS + 3):
        for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
            x = torch.randn(m, k, generator=gen).to(dtype)
            y = cpu_fp8.fp8_linear(x, w, scale, block)
            ref = x.double() @ dense.t()
            assert float((y.double() - ref).norm() / ref.norm()) < tol, (m, dtype)
    # per-token scales of FP8 codes passed as x (the W8A8 path): row m of the product x s[m]
    codes = torch.randn(3, k, generator=gen).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    xs = torch.rand(3, generator=gen) + 0.1
    for dtype in (torch.float32, torch.bfloat16):
        y = cpu_fp8.fp8_linear(codes.to(dtype), w, scale, block, xs, torch.float32)
        ref = (codes.double() * xs.double()[:, None]) @ dense.t()
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-6, dtype  # codes are exact in bf16
    with pytest.raises(ValueError, match=r"x_scale must be contiguous float32 \[3\]"):
        cpu_fp8.fp8_linear(codes, w, scale, block, xs.double())
    for bad in (scale.double(), torch.ones(scale.shape[0] + 1, scale.shape[1])):
        with pytest.raises(ValueError, match=r"scale must be contiguous float32"):
            cpu_fp8.fp8_linear(torch.zeros(1, k), w, bad, block)
    with pytest.raises(ValueError, match=rf"x must be \[M, {k}\]"):
        cpu_fp8.fp8_linear(torch.zeros(1, k + 1), w, scale, block)


def test_e4m3_rounding_equals_torchs_cast():
    """Every e4m3 value, every midpoint between neighbours (ties) and one fp32 ulp either
    side, and random values over the whole range: the integer-op rounding is the cast."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()
    mid = (grid[1:] + grid[:-1]) / 2
    gen = torch.Generator().manual_seed(5)
    y = torch.cat([grid, mid, torch.nextafter(mid, grid[1:]), torch.nextafter(mid, grid[:-1]),
                   torch.rand(20000, generator=gen) * 896 - 448, torch.randn(20000, generator=gen) * 0.01])
    assert torch.equal(round_to_e4m3(y.clone()), y.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("to_int8,group,static", [(True, 0, False), (True, 0, True), (False, 0, False),
                                                  (False, 0, True), (False, 128, False)])
def test_cpu_activation_quantization_is_the_gpu_kernels_rule(to_int8, group, static):
    """fake_quant returns exactly the codes x scales of mixq.kernels.quant.quant_reference,
    the plain-torch twin the Triton kernels are tested against: CPU and GPU quantize alike."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(9, 300, generator=gen) * 3
    x[2] = 0  # an all-zero row: the 1e-10 floor, no division by zero
    st = torch.tensor([0.05]) if static else None
    q, s = quant_reference(x, group, st, to_int8)
    want = q.float() * s if not group else (
        torch.nn.functional.pad(q.float(), (0, -300 % group)).reshape(9, -1, group) * s[:, :, None]).reshape(9, -1)[:, :300]
    assert torch.equal(fake_quant(x, to_int8, group, st), want)


@pytest.mark.parametrize("to_int8", [True, False])
@pytest.mark.parametrize("static", [False, True])
def test_c_token_quantization_equals_the_torch_rule(to_int8, static):
    """The C per-token quantizer (what the CPU methods call) against token_codes in torch ops,
    bit for bit: fp32 and bf16 inputs, exact ties (k + 0.5 codes, e4m3 midpoints), a zero row,
    values past a static scale's range."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 200, generator=gen) * 4
    x[1] = 0
    st = torch.tensor([0.01]) if static else None
    if not static:  # row 2: amax 127 -> s = 1, so the x.5 entries are exact ties
        x[2, :50] = torch.arange(50) + 0.5
        x[2, 50] = 127.0
    for dtype in (torch.float32, torch.bfloat16):
        xi = x.to(dtype)
        for codes_dtype in (torch.float32, torch.bfloat16):
            q, s = cpu_fp8.quant_rows(xi, to_int8, st, codes_dtype)
            q2, s2 = token_codes_torch(xi, to_int8, st, codes_dtype)
            assert torch.equal(s, s2) and torch.equal(q, q2), (dtype, codes_dtype)


def _gguf_weight(qtype: str, n: int, k: int, gen: torch.Generator) -> tuple[QuantizedWeight, torch.Tensor]:
    """(QuantizedWeight of `qtype` blocks for a random [N, K] weight, float64 W from the
    gguf package's own dequantization of the same bytes)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from mixq.formats.gguf import gguf_spec

    qt = gguf.GGMLQuantizationType[qtype.upper()]
    w = (torch.randn(n, k, generator=gen) * 0.05).numpy().astype(np.float32)
    raw = gguf.quants.quantize(w, qt)  # uint8 [N, K/32 * bytes per block]
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qt)).double()
    blocks = torch.from_numpy(raw.reshape(n, k // 32, -1).copy())
    return QuantizedWeight("m.weight", gguf_spec(qtype), (n, k), {"blocks": blocks}), ref


@pytest.mark.parametrize("qtype,method", [("q4_0", CPUInt4Method), ("q4_1", CPUInt4Method), ("q8_0", CPUQ80Method)])
@pytest.mark.parametrize("n,k", [(40, 96), (200, 576)])  # N % 16 != 0; N across OpenMP threads
def test_gguf_blocks_against_ggufs_dequantization(qtype, method, n, k):
    """GGUF q4_0 / q4_1 (torch's int4 kernel: scale d, zero m + 8 d) and q8_0 (the C kernel
    over the blocks as stored) against x @ W^T in float64, W from gguf-py. fp32: fp32
    rounding only (1e-5). bf16: x, the output and (int4) the bf16 scale/zero table round
    to bf16, 2**-9 relative each (1.5e-2)."""
    gen = torch.Generator().manual_seed(n + k)
    qw, w = _gguf_weight(qtype, n, k, gen)
    assert select_method(qw.spec, CPU, qw.name).name == method.name
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1.5e-2)):
        held = method().prepare(qw, dtype)
        for m in (1, 2, 3, 5, 17):  # the GEMV's 1-4 row groups and (q8_0) the tile path
            x = torch.randn(m, k, generator=gen).to(dtype)
            y = method().apply(held, x, None)
            assert y.dtype == dtype and y.shape == (m, n)
            ref = x.double() @ w.t()
            err = float((y.double() - ref).norm() / ref.norm())
            assert err < tol, (qtype, dtype, m, err)
    if qtype == "q8_0":  # read as stored: the very blocks, no copy
        assert held.tensors["blocks"].data_ptr() == qw.tensors["blocks"].data_ptr()
    else:  # still 4-bit: N padded to 16, packed nibbles and a bf16 scale/zero pair per 32 columns
        np_ = -(-n // 16) * 16
        assert held.nbytes == np_ * k // 2 + np_ * (k // 32) * 2 * 2


def test_q8_0_scales_of_every_fp16_class():
    """The C kernel decodes each block's fp16 scale (F16C's vcvtph2ps where the CPU has it,
    else integer ops): zero, subnormals, negatives, the largest normal, against gguf-py's
    dequantization of the same bytes. fp32 x: fp32 rounding only (1e-6)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    gen = torch.Generator().manual_seed(9)
    n, k = 24, 64
    blocks = torch.randint(0, 256, (n, k // 32, 34), dtype=torch.uint8, generator=gen)
    bits = [0x0000, 0x8000, 0x0001, 0x03FF, 0x8200, 0x0400, 0x3C00, 0xBC00, 0x7BFF, 0x1234, 0x2E66, 0xA9F0]
    d = torch.tensor(bits * (n * (k // 32) // len(bits)), dtype=torch.int32).to(torch.int16).view(n, k // 32, 1)
    blocks[:, :, :2] = d.view(torch.uint8).view(n, k // 32, 2)
    raw = blocks.reshape(n, -1).numpy()
    w = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).astype(np.float64))
    x = torch.randn(3, k, generator=gen) * 1e-3
    y = cpu_gguf.q8_0_linear(x, blocks)
    ref = x.double() @ w.t()
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < 1e-6, err
    # 65504 * 127 * ~1e-3 * 64 terms: finite in fp32, so a wrong exponent would show
    assert torch.isfinite(y).all()


def test_tied_q8_0_embedding_and_head_share_the_blocks():
    """A tied q8_0 table: the lookup and the LM head (the C kernel) read one copy of the
    blocks; both against gguf-py's dequantization."""
    from mixq.layers.embedding import Embedding

    gen = torch.Generator().manual_seed(9)
    qw, w = _gguf_weight("q8_0", 300, 64, gen)
    emb = Embedding(300, 64, tied=True)
    emb.load(qw, torch.float32)
    assert emb.head.method.name == CPUQ80Method.name
    assert emb.head.weight.tensors["blocks"].data_ptr() == emb.qweight.tensors["blocks"].data_ptr()
    ids = torch.tensor([0, 299, 17])
    torch.testing.assert_close(emb(ids).double(), w[ids], rtol=0, atol=1e-7)
    h = torch.randn(2, 64, generator=gen)
    ref = h.double() @ w.t()
    assert float((emb.as_lm_head(h).double() - ref).norm() / ref.norm()) < 1e-5
    # a bf16 model gets float32 logits from the C kernel (fp32 sums, never rounded to bf16)
    emb16 = Embedding(300, 64, tied=True)
    emb16.load(qw, torch.bfloat16)
    hb = h.bfloat16()
    y = emb16.as_lm_head(hb)
    ref = hb.double() @ w.t()
    assert y.dtype == torch.float32 and float((y.double() - ref).norm() / ref.norm()) < 1e-5


def test_int4_prefill_tiles_read_this_torchs_packing():
    """M >= TILE_MIN_ROWS runs dequantized tiles (the M=70 cases above check their numbers):
    that needs `_unpack_int4` to read torch's packing, whole 64-row blocks and a short last
    one (N = 16..48 mod 64), else every call would silently take the (slow) kernel."""
    from mixq.kernels import cpu_methods

    assert cpu_methods._int4_layout_known()
    gen = torch.Generator().manual_seed(5)
    for n in (16, 48, 64, 144, 208):
        q = torch.randint(0, 16, (n, 160), dtype=torch.int32, generator=gen)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        assert torch.equal(cpu_methods._unpack_int4(packed).to(torch.int32), q), n
