"""`mixq export` on bad input: an occupied output directory, a disk that fills, a format
with no compressed-tensors form, zero points that do not fit. Each is one clear error
naming what is wrong, and nothing that looks like a checkpoint is left behind."""

from __future__ import annotations

import errno
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mixq.export.writer as writer
from mixq.cli import main
from mixq.config.schema import MixedPrecisionConfig
from mixq.errors import CheckpointError, MixqError, UnsupportedFormatError
from mixq.export import export_mix
from mixq.export.schemes import scheme_for
from mixq.formats import build_plan
from mixq.formats.packing import pack_int32, unpack_int32
from mixq.formats.spec import WeightSpec

FIX = Path(__file__).parent / "fixtures" / "tiny-llama"
MIX = {"model.layers.*.self_attn.*_proj.weight": "gptq_int4", "model.layers.*.mlp.*_proj.weight": "fp8"}


def cfg(gptq: Path = FIX / "gptq-legacy-4bit-asym") -> MixedPrecisionConfig:
    return MixedPrecisionConfig.from_dict({"mixed_precision": {
        "fp16_path": str(FIX / "bf16"), "gptq_int4_path": str(gptq), "fp8_path": str(FIX / "fp8-dynamic"),
        "weight_mapping": MIX}})


def export(c, out, **kw):
    return export_mix(c, out, progress=False, log=lambda s: None, **kw)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_occupied_output_needs_overwrite_and_a_source_is_never_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MixqError, match=f"output {out} exists and is not empty; pass --overwrite"):
        export(cfg(), out)
    assert (out / "keep.txt").read_text() == "mine"
    export(cfg(), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()
    export(cfg(), tmp_path / "empty")  # an empty directory is fine
    with pytest.raises(MixqError, match="overlaps the source checkpoint"):
        export(cfg(), FIX / "bf16", overwrite=True)
    with pytest.raises(MixqError, match="overlaps the source checkpoint"):
        export(cfg(), FIX / "fp8-dynamic" / "sub", overwrite=True)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_disk_that_fills_leaves_nothing_that_looks_complete(overwrite, tmp_path, monkeypatch):
    out = tmp_path / "out"
    if overwrite:
        export(cfg(), out)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = writer.save_file, []

    def fills_up(*a, **kw):
        calls.append(a[1])
        if len(calls) == 3:  # the third shard meets a full disk, half-written
            Path(a[1]).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(writer, "save_file", fills_up)
    with pytest.raises(MixqError, match=rf"writing {out}: \[Errno 28\] No space left on device; nothing was written"):
        export(cfg(), out, overwrite=overwrite, shard_bytes=40_000)
    assert len(calls) == 3
    if overwrite:  # the previous export is untouched
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()
    assert leftovers(tmp_path) == []


def test_shards_and_index_when_the_model_does_not_fit_one_file(tmp_path):
    export(cfg(), tmp_path / "out", shard_bytes=100_000)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for f in files:  # no shard over the limit unless it holds a single larger tensor
        t = load_file(str(tmp_path / "out" / f))
        assert len(t) == 1 or sum(v.numel() * v.element_size() for v in t.values()) <= 100_000
    back = build_plan(model_path=str(tmp_path / "out"))
    assert set(back.tensors) == set(build_plan(cfg()).tensors)
    assert oct((tmp_path / "out" / files[0]).stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    import os

    m = os.umask(0)
    os.umask(m)
    return m


def test_a_format_without_compressed_tensors_form_is_refused_naming_tensor_and_format(tmp_path, monkeypatch):
    """A layout the exporter does not know (as a new reader, e.g. GGUF's Q4_K, would add)
    is refused by default, before anything is written."""
    spec = WeightSpec(layout="gguf", bits=4, dtype=torch.uint8, scale_layout="block", block_size=(1, 256))
    with pytest.raises(UnsupportedFormatError, match=r"^x\.weight: gguf int4 block1x256 \(layout 'gguf'\) has no "):
        scheme_for("x.weight", spec)
    with pytest.raises(UnsupportedFormatError, match="3-bit integers"):
        scheme_for("y.weight", WeightSpec(layout="gptq", bits=3, dtype=torch.int32, scale_layout="group", group_size=64))
    with pytest.raises(UnsupportedFormatError, match="packed integer weights with quantized activations"):
        scheme_for("w.weight", WeightSpec(layout="ct-packed", bits=4, dtype=torch.int32, scale_layout="group",
                                          group_size=128, activation="dynamic-token"))
    with pytest.raises(UnsupportedFormatError, match="float8_e5m2"):
        scheme_for("z.weight", WeightSpec(layout="fp8", bits=8, dtype=torch.float8_e5m2, scale_layout="tensor"))

    def with_gguf_tensor(c):
        plan = build_plan(c)
        name = "model.layers.1.mlp.down_proj.weight"
        t = plan.tensors[name]
        plan.tensors[name] = replace(t, entry=replace(t.entry, spec=replace(spec, bits=8)))
        return plan

    monkeypatch.setattr(writer, "build_plan", with_gguf_tensor)
    with pytest.raises(UnsupportedFormatError, match=r"model\.layers\.1\.mlp\.down_proj\.weight: gguf int8 .*'gguf'"):
        export(cfg(), tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def _edit_zeros(tmp_path: Path, src: Path, name: str, nibble: int) -> Path:
    """A copy of a GPTQ v1 checkpoint with the first stored zero of `name` set to `nibble`."""
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    z = unpack_int32(tensors[name], 4, dim=1)
    z[0, 0] = nibble
    tensors[name] = pack_int32(z, 4, dim=1)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_gptq_v1_zero_of_16_has_no_compressed_tensors_form(tmp_path):
    """GPTQ v1 stores zero - 1 in 4 bits: a stored 15 means a zero of 16, which mixq reads
    (as every v1 kernel does) but no 4-bit zero point can hold."""
    q = "model.layers.0.self_attn.q_proj"
    src = _edit_zeros(tmp_path, FIX / "gptq-legacy-4bit-asym", f"{q}.qzeros", 15)
    assert build_plan(cfg(src)).catalogs["gptq_int4_path"].read(f"{q}.weight").dequantize().abs().max() > 0
    with pytest.raises(CheckpointError, match=rf"^{q}\.weight: gptq int4 g64 asym has 1 zero points outside \[0, 15\] "
                                              r"\(e\.g\. 16: .*no lossless compressed-tensors form"):
        export(cfg(src), tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_symmetric_gptq_whose_zeros_are_not_the_midpoint_is_refused(tmp_path):
    k = "model.layers.1.self_attn.k_proj"
    src = _edit_zeros(tmp_path, FIX / "gptq-legacy-4bit-desc-act", f"{k}.qzeros", 3)  # zero 4, not 8
    with pytest.raises(CheckpointError, match=rf"^{k}\.weight: .* declared symmetric but 1 of its zero points are not 8"):
        export(cfg(src), tmp_path / "out")


def test_verify_reads_the_export_back_before_it_is_moved_into_place(tmp_path, monkeypatch):
    export(cfg(), tmp_path / "ok", verify=True)
    real = writer.to_compressed_tensors

    def flips_a_code(qw, scheme):
        out = real(qw, scheme)
        if qw.name == "model.layers.1.self_attn.v_proj.weight":
            packed = out["model.layers.1.self_attn.v_proj.weight_packed"]
            packed[0, 0] ^= 1
        return out

    monkeypatch.setattr(writer, "to_compressed_tensors", flips_a_code)
    with pytest.raises(CheckpointError, match=r"export verify: model\.layers\.1\.self_attn\.v_proj\.weight reads back"):
        export(cfg(), tmp_path / "bad", verify=True)
    assert not (tmp_path / "bad").exists() and leftovers(tmp_path) == []


def test_cli_export_prints_a_summary_and_bad_flags_are_one_line(tmp_path, capsys):
    yaml = tmp_path / "mix.yaml"
    yaml.write_text(
        "mixed_precision:\n"
        f"  fp16_path: {FIX / 'bf16'}\n  gptq_int4_path: {FIX / 'gptq-legacy-4bit-desc-act'}\n"
        "  weight_mapping:\n    'model.layers.1.*_proj.weight': gptq_int4\n")
    assert main(["export", "--mixed-precision-config", str(yaml), "-o", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    assert f"wrote {tmp_path / 'out'}" in shown and "7 x pack-quantized int4 g32 act-order" in shown
    assert "vLLM 0.34.0 would refuse or mis-load" in shown and "SGLang 0.5.23: accepts every scheme" in shown

    for argv, why in (
        (["-o", str(tmp_path / "out")], "exists and is not empty; pass --overwrite"),
        (["-o", str(tmp_path / "v"), "--target", "vllm"], "--target vllm: vLLM 0.34.0 would refuse"),
        (["-o", str(tmp_path / "s"), "--max-shard-size", "0"], "--max-shard-size must be > 0 GiB, got 0.0"),
    ):
        assert main(["export", "--mixed-precision-config", str(yaml), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mixq export: error: ") and why in err and "Traceback" not in err
