"""`mixq plot-experts`: the picture shows the stats' numbers; a missing matplotlib is a
clear error naming the install command."""

from __future__ import annotations

import sys

import pytest

from mixq.cli import main
from mixq.tracking.experts import ExpertActivationTracker
from mixq.tracking.plot import plot_expert_heatmap

TOKENS = {(0, 0): 40, (0, 3): 10, (2, 1): 7, (2, 2): 21}  # layer 1 is dense: no row


@pytest.fixture
def stats(tmp_path):
    t = ExpertActivationTracker(num_experts=4)
    for (layer, expert), n in TOKENS.items():
        t.record_expert_activation(layer, expert, tokens_processed=n)
    t.record_expert_activation(0, 3, tokens_processed=5)  # expert (0, 3): 2 activations, 15 tokens
    return t.export_stats(tmp_path / "s.json"), tmp_path / "s.json"


def test_heatmap_shows_the_stats(stats, tmp_path):
    doc, _ = stats
    fig = plot_expert_heatmap(doc, tmp_path / "a.png")
    img = fig.axes[0].images[0].get_array()
    # rows: layers 0 and 2; each row is that layer's share of routed tokens
    assert img.shape == (2, 4)
    want = [[40 / 55, 0, 0, 15 / 55], [0, 7 / 28, 21 / 28, 0]]
    assert [[round(float(v), 12) for v in row] for row in img] == [[round(v, 12) for v in row] for row in want]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0", "2"]
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plot_expert_heatmap(doc, tmp_path / "b.svg", metric="activations", normalize=False)
    assert fig.axes[0].images[0].get_array().tolist() == [[1, 0, 0, 2], [0, 1, 1, 0]]
    assert (tmp_path / "b.svg").read_text().lstrip().startswith("<?xml")


def test_cli_and_missing_matplotlib(stats, tmp_path, capsys, monkeypatch):
    _, path = stats
    assert main(["plot-experts", str(path), "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["plot-experts", str(path), "-o", str(tmp_path / "d.png")]) == 2
    assert "pip install 'mixq[plot]'" in capsys.readouterr().err
    assert main(["plot-experts", str(tmp_path / "nope.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
