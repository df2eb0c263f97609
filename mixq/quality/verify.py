"""The check after `mixq plan --measure`'s knapsack: score the planned mix, every uniform
candidate that fits the budget (one format for every unit) and a few runners-up of the
knapsack by their KL divergence from the base model on calibration text, and keep the best.

Why: the knapsack adds per-unit estimates taken on a few hundred calibration tokens. Where
the choices are close (at exactly the INT4 size the only freedom is GPTQ vs AWQ per unit)
those estimates' noise decides, and the sum of the estimates is not the loss of the whole
mix. A user must never get a plan worse than the best single checkpoint that fits.

Which tokens: the calibration text (never the evaluation text), the tokens *after* the ones
`mixq measure` used. The plan is fit to the measured tokens, so on them it beats the uniform
candidates by construction (on the embedded model at the INT4 size: plan 0.360 vs AWQ 0.392
mean KLD on the 255 measured tokens of Julius Caesar, yet 0.357 vs 0.354 on the next 1020,
and worse than AWQ on The Tempest as well). Same text file, window, dtype and device as the
measurement; the base model's log-probabilities are computed once (mixq.quality.evaluate)."""

from __future__ import annotations

import hashlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from mixq.errors import MixqError


@dataclass
class VerifySettings:
    tokens: int = 1024  # held-out calibration tokens to score on
    neighbors: int = 2  # runners-up of the exact knapsack to score too
    device: str | None = None  # default: the device measure ran on


@dataclass
class Contender:
    name: str  # "plan", "uniform awq_int4", "runner-up 1"
    assignment: dict[str, str]  # unit id -> precision
    bytes: int  # every weight, as mixq inspect counts them
    estimated_loss: float  # the sum of the per-unit estimates


def measured_tokens(cal: dict) -> int:
    """How many tokens of the calibration text `mixq measure` read (older measure files
    record only the scored ones: each window of W tokens scores W - 1)."""
    if "text_tokens" in cal:
        return int(cal["text_tokens"])
    n, w = int(cal["tokens"]), int(cal["window"])
    t = n
    while t - math.ceil(t / w) < n:
        t += 1
    return t


def calibration_text(cal: dict, where: str) -> tuple[str, str]:
    """(text, name) of the text measure calibrated on: the shipped calibration text or the
    --text file it named, checked against the recorded digest."""
    from mixq.assets.text import CALIBRATION_TEXT_NAME, load_calibration_text

    name = cal["text"]
    if name == CALIBRATION_TEXT_NAME:
        text = load_calibration_text()
    else:
        try:
            text = Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MixqError(f"{where}: cannot read its calibration text {name} to verify the plan ({e}); "
                            "give --disable-verify") from None
    if hashlib.sha256(text.encode()).hexdigest() != cal["sha256"]:
        raise MixqError(f"{where}: the calibration text {name} changed since it was measured (sha256 differs); "
                        "re-measure or give --disable-verify")
    return text, name


def score(contenders: list[Contender], configs: dict[str, dict], base_path: str, doc: dict, where: str,
          settings: VerifySettings, progress: bool | None = None) -> dict:
    """Mean KLD from the base of each contender (its config document in `configs`) on the
    held-out calibration tokens; the verification record the planner writes down."""
    from mixq.quality.evaluate import EvalTarget, evaluate

    cal = doc["calibration"]
    text, name = calibration_text(cal, where)
    skip = measured_tokens(cal)
    if settings.tokens < 2:
        raise MixqError(f"--verify-tokens must be >= 2, got {settings.tokens}")
    with tempfile.TemporaryDirectory(prefix="mixq-verify-") as tmp:
        targets = []
        for i, c in enumerate(contenders):
            path = Path(tmp) / f"contender-{i}.yaml"
            path.write_text(yaml.safe_dump(configs[c.name], sort_keys=False, width=4096))
            targets.append(EvalTarget(c.name, str(path)))
        try:
            rows = evaluate(targets, text, int(cal["window"]), settings.tokens, base=base_path,
                            device=settings.device or cal["device"], dtype=cal["dtype"], progress=progress,
                            text_name=name, skip=skip)
        except MixqError as e:
            raise MixqError(f"verifying the plan on the calibration tokens after the {skip} measured: {e} "
                            "(give --verify-tokens, or --disable-verify)") from None
    first = next(iter(rows.values()))
    read = measured_tokens({"tokens": first["tokens"], "window": cal["window"]})  # the text tokens scored on
    return {"text": name, "first_token": skip, "last_token": skip + read - 1, "tokens": first["tokens"],
            "window": int(cal["window"]),
            "dtype": cal["dtype"],
            "contenders": {c.name: {"bytes": c.bytes, "estimated_loss": c.estimated_loss,
                                    "kld_mean": rows[c.name]["kld_mean"], "perplexity": rows[c.name]["perplexity"]}
                           for c in contenders}}


def best(contenders: list[Contender], record: dict) -> Contender:
    """The lowest calibration KLD; a tie keeps the earlier contender (the plan first)."""
    return min(contenders, key=lambda c: record["contenders"][c.name]["kld_mean"])
