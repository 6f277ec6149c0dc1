"""Section IV-E: parameters, FLOPs by the paper's formulas, storage."""

from __future__ import annotations

from ferpipe.model.complexity import complexity_report, layer_costs, measure_complexity
from ferpipe.model.networks import build_classifier

CONV = 22_118_400 + 4 * 117_964_800 + 3 * 58_982_400  # 2*Ci*9*Co*W*H over the eight convolutions
POOL = 80 * 80 * 16 + 40 * 40 * 32 + 20 * 20 * 64 + 10 * 10 * 128


def test_flops_follow_the_papers_formulas():
    c7, c8 = measure_complexity(7), measure_complexity(8)
    assert c7.flops == CONV + POOL + 2 * (128 * 128 * 2 + 128 * 7) == 671_184_128
    assert c8.flops == 671_184_384
    assert c7.parameters == 329_367 and c8.parameters == 329_496
    assert c7.storage_bytes == 4 * 329_367 and c7.ensemble_parameters == 5 * 329_367


def test_layer_walk_reaches_inside_nested_models():
    costs = layer_costs(build_classifier(7))
    assert sum(c.kind == "Conv2D" for c in costs) == 8 and sum(c.kind == "Dense" for c in costs) == 3
    assert sum(c.parameters for c in costs) == 329_367
    first = next(c for c in costs if c.name == "extractor/block1_conv1")
    assert first.flops == 2 * 3 * 9 * 16 * 160 * 160


def test_report_puts_the_papers_figures_beside_ours():
    report = complexity_report(8)
    assert "0.671" in report and "0.555" in report and "329,496" in report and "1,647,480" in report
    assert "exceed" in report
