"""The one validation layer for sampling parameters: every field's type and range, the
API door (`from_dict`: request names, the server's cap on n, unknown names), checked
against a table written by hand here, not derived from the code's rules."""

from __future__ import annotations

import math

import pytest

from mixq.engine.sampling_params import SamplingParamError, SamplingParams

BIG = 10**20
# field -> (values that must be accepted, values that must be refused)
CASES = {
    "max_new_tokens": ([1, 7, 2**31 - 1], [0, -1, 2**31, BIG, 1.0, 1.5, "4", True, None]),
    "min_new_tokens": ([0, 3], [-1, 1.0, "1", False]),
    "temperature": ([0, 0.0, 1e-300, 0.7, 2, 1e300], [-1e-9, -1, math.inf, -math.inf, math.nan, "1", True, None]),
    "top_k": ([-1, 0, 1, 50, 2**31 - 1], [-2, 2**31, BIG, 1.0, "5", True]),
    "top_p": ([1e-9, 0.5, 1, 1.0], [0, -0.1, 1.0000001, 2, math.nan, math.inf, "0.5", False]),
    "min_p": ([0, 0.5, 1], [-0.1, 1.1, math.nan, "0"]),
    "repetition_penalty": ([1e-6, 1, 2], [0, -1, 2.01, math.inf, math.nan]),
    "frequency_penalty": ([-2, 0, 2], [-2.1, 2.1, math.inf, math.nan, True]),
    "presence_penalty": ([-2, 0.5, 2], [2.5, -math.inf, "0"]),
    "seed": ([None, 0, -(2**63), 2**63 - 1], [2**64, 2**63, -(2**63) - 1, 1.0, "3", True]),
    "stop": (["x", ["a", "bc"], [], ["s"] * 16, "y" * 256], ["", [""], [1], ["s"] * 17, "y" * 257, {"a": 1}, 5]),
    "stop_token_ids": ([[], [0, 5], list(range(1024))], [[-1], [1.0], [True], list(range(1025)), 5, "1", [BIG]]),
    "ignore_eos": ([True, False], [1, 0, "true", None]),
    "n": ([1, 4], [0, -1, 1.0, "2", True]),
    "logprobs": ([None, 0, 5, 20], [-1, 21, 1.0, True, "2"]),
    "skip_special_tokens": ([True, False], [1, "false"]),
    # structured outputs: JSON text of an object or a boolean (a dict is serialized); whether
    # the grammar library takes it is mixq.engine.grammar's check (tests/engine/test_structured.py)
    "json_schema": ([None, '{"type": "object"}', {"type": "string", "maxLength": 3}, True, "{}"],
                    ["", 5, ["a"], "{not json", "[1]", '"s"', {"a": math.nan}, " " * 131073]),
    "regex": ([None, "a+", "[0-9]{2}", "x" * 131072], ["", 5, ["a"], "x" * 131073]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_field_accepts_its_range_and_refuses_the_rest(name):
    good, bad = CASES[name]
    for v in good:
        SamplingParams(**{name: v})
    for v in bad:
        with pytest.raises(SamplingParamError) as e:
            SamplingParams(**{name: v})
        assert e.value.param == name and str(e.value).startswith(f"{name} must be "), (v, str(e.value))
        assert len(str(e.value)) < 300  # a huge value is shown shortened


def test_every_field_has_a_case_here():
    from dataclasses import fields

    assert {f.name for f in fields(SamplingParams)} == set(CASES)


def test_min_new_tokens_cannot_exceed_max_and_stop_normalizes():
    with pytest.raises(SamplingParamError, match=r"min_new_tokens must be in \[0, max_new_tokens 4\], got 5"):
        SamplingParams(max_new_tokens=4, min_new_tokens=5)
    assert SamplingParams(stop="x").stop == ["x"] and SamplingParams(stop=None).stop == []
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


def test_tiny_temperatures_are_greedy():
    assert SamplingParams(temperature=1e-300).greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-4).greedy


def test_validate_catches_a_field_changed_after_construction():
    sp = SamplingParams(seed=1)
    sp.seed = 2**64
    with pytest.raises(SamplingParamError, match="seed must be"):
        sp.validate()


def test_one_constraint_at_most_named_as_the_request_did():
    with pytest.raises(SamplingParamError, match=r"^regex and json_schema both constrain the output") as e:
        SamplingParams(regex="a", json_schema="{}")
    assert e.value.param == "regex"
    with pytest.raises(SamplingParamError, match=r"^sampling_params\.regex and sampling_params\.json_schema both") as e:
        SamplingParams.from_dict({"json_schema": {}, "regex": "a"}, prefix="sampling_params.")
    assert e.value.param == "sampling_params.regex"
    sp = SamplingParams.from_dict({"rf": {"type": "object"}}, aliases={"rf": "json_schema"})
    assert sp.constraint == ("json_schema", '{"type": "object"}')
    assert sp.renamed(SamplingParamError("json_schema", "json_schema is bad")).param == "rf"


def test_from_dict_names_the_field_as_the_request_did():
    with pytest.raises(SamplingParamError, match=r"^max_tokens must be an integer in \[1, 2147483647\], got 0$") as e:
        SamplingParams.from_dict({"max_tokens": 0})
    assert e.value.param == "max_tokens"
    with pytest.raises(SamplingParamError, match=r"^min_tokens must be") as e:
        SamplingParams.from_dict({"min_tokens": "2"})
    with pytest.raises(SamplingParamError, match=r"^sampling_params\.top_p must be a number in \(0, 1\], got 2$"):
        SamplingParams.from_dict({"top_p": 2}, prefix="sampling_params.")
    with pytest.raises(SamplingParamError, match=r"^top_logprobs must be") as e:
        SamplingParams.from_dict({"top_logprobs": 30}, aliases={"top_logprobs": "logprobs"})
    assert e.value.param == "top_logprobs"


def test_from_dict_unknown_duplicate_null_and_the_cap_on_n():
    with pytest.raises(SamplingParamError, match="unknown sampling parameter temprature"):
        SamplingParams.from_dict({"temprature": 1})
    with pytest.raises(SamplingParamError, match="max_tokens and max_new_tokens set the same parameter"):
        SamplingParams.from_dict({"max_new_tokens": 3, "max_tokens": 4})
    sp = SamplingParams.from_dict({"max_tokens": 5, "temperature": None, "seed": None})
    assert (sp.max_new_tokens, sp.temperature, sp.seed) == (5, 1.0, None)  # null keeps the default
    assert SamplingParams.from_dict({"n": 16}, max_n=16).n == 16
    with pytest.raises(SamplingParamError, match=r"^n must be at most 16 on this server \(--max-n\), got 17$"):
        SamplingParams.from_dict({"n": 17}, max_n=16)
    with pytest.raises(SamplingParamError, match="sampling_params must be a JSON object"):
        SamplingParams.from_dict([1, 2])
