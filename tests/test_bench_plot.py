"""The bench figure tells each defense from the undefended merges at a glance."""

from __future__ import annotations

import matplotlib

from dam_mergekit.lab.bench.figure import draw, method_groups, plot
from dam_mergekit.lab.protocol import best_undefended

NAMES = [
    "pretrained",
    "expert:digits",
    "expert:shapes",
    "control:digits",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "task_arithmetic_clean_control",
    "dam",
    "dam_as_released",
    "awm",
]


def _results(acc_of=lambda i: 50.0 + i):
    row = lambda i: {  # noqa: E731
        "acc_avg": acc_of(i),
        "asr_succession_avg": 90.0 - 5 * i,
        "asr_transfer_avg": 10.0,
        "p0_succession_avg": 4.0,
        "p0_transfer_avg": 3.0,
        "std": {"acc_avg": 1.0},
    }
    return {
        "zoo": {"kind": "clip", "attack": {"name": "badnets"}, "options": {}},
        "seeds": [0, 1],
        "methods": {name: row(i) for i, name in enumerate(NAMES)},
    }


def test_groups_split_single_models_undefended_merges_and_defenses():
    groups = dict(method_groups(NAMES + ["my_defense"]))
    assert groups["single models"] == NAMES[:4]
    assert groups["undefended merges"] == NAMES[4:8]
    assert groups["defenses"] == ["dam", "dam_as_released", "awm", "my_defense"]


def test_best_undefended_is_the_most_accurate_plain_merge():
    results = _results(acc_of=lambda i: 80.0 if i == 5 else 50.0)  # ties
    assert best_undefended(results["methods"]) == "ties"
    assert best_undefended({"dam": {"acc_avg": 99.0}}) is None


def test_figure_has_one_bar_group_per_method_and_a_short_legend(tmp_path):
    fig = draw(_results())
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == 5  # ACC, two ASRs, p0, best undefended merge: not one per method
    assert any("p0" in label for label in labels)
    assert any("best undefended merge (dare_ties)" in label for label in labels)
    # every p0 is drawn: one tick per method and ASR kind
    ticks = [c for c in ax.collections if c.get_gid() == "p0"]
    assert sum(len(c.get_segments()) for c in ticks) == 2 * len(NAMES)
    matplotlib.pyplot.close(fig)
    path = tmp_path / "figure.tmp"  # a staged name: the format must not come from the suffix
    plot(_results(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
