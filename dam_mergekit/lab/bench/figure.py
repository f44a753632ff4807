"""The bench's figure: grouped bars per method, so each defense reads against the undefended merges.

Per method three bars (clean accuracy, succession ASR, transfer ASR) with their seed std, and a
black tick on each ASR bar at p0, the rate at which the same inputs already land on the target
class without the trigger. Dashed lines carry the best undefended merge across the whole figure.
"""

from __future__ import annotations

from pathlib import Path

from dam_mergekit.lab.protocol import DOWN_WEIGHTED, NO_BACKDOOR, UNDEFENDED, best_undefended

BARS = (  # key, p0 key, label, colour, hatch
    ("acc_avg", None, "clean accuracy (mean over tasks)", "tab:blue", ""),
    (
        "asr_succession_avg",
        "p0_succession_avg",
        "ASR, backdoored tasks (succession)",
        "tab:red",
        "",
    ),
    ("asr_transfer_avg", "p0_transfer_avg", "ASR, clean tasks (transfer)", "tab:orange", "//"),
)


def method_groups(names: list[str]) -> list[tuple[str, list[str]]]:
    """The bench's rows as (group title, names): single models, undefended merges, defenses."""
    single = [n for n in names if n == "pretrained" or n.startswith(("expert:", "control:"))]
    undefended = [n for n in names if n in UNDEFENDED or n in (NO_BACKDOOR, DOWN_WEIGHTED)]
    defenses = [n for n in names if n not in single and n not in undefended]
    groups = [("single models", single), ("undefended merges", undefended), ("defenses", defenses)]
    return [(title, members) for title, members in groups if members]


def draw(results: dict):
    """The figure (not saved): bars per method, groups shaded, the best undefended merge drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    groups = method_groups(list(methods))
    order = [name for _, members in groups for name in members]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.75 * len(order) + 2), 5.5))
    width = 0.27
    for j, (key, p0_key, label, colour, hatch) in enumerate(BARS):
        xs = [i + (j - 1) * width for i in range(len(order))]
        values = [methods[n].get(key) for n in order]
        stds = [methods[n].get("std", {}).get(key) or 0.0 for n in order]
        heights = [v if v is not None else 0.0 for v in values]
        spread = stds if any(stds) else None  # one seed: no error bars, not flat caps
        ax.bar(xs, heights, width, yerr=spread, color=colour, hatch=hatch, label=label, capsize=2)
        if p0_key is None:
            continue
        marked = [
            (x, methods[n][p0_key])
            for x, n in zip(xs, order, strict=True)
            if methods[n].get(p0_key) is not None
        ]
        ax.hlines(
            [p0 for _, p0 in marked],
            [x - width / 2 for x, _ in marked],
            [x + width / 2 for x, _ in marked],
            colors="black",
            linewidth=2,
            gid="p0",
        )
    ax.hlines([], 0, 0, colors="black", linewidth=2, label="p0 (target rate without trigger)")
    _shade_groups(ax, groups)
    _mark_best_undefended(ax, methods)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 112)
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_ylabel("%")
    zoo = results.get("zoo", {})
    ax.set_title(
        f"Bench: {zoo.get('kind', '?')} zoo, attack "
        f"{zoo.get('attack', {}).get('name')} ({zoo.get('options', {}).get('attack_mode')}), "
        f"seeds {results.get('seeds')}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, frameon=False)
    return fig


def _shade_groups(ax, groups: list[tuple[str, list[str]]]) -> None:
    start = 0
    for k, (title, members) in enumerate(groups):
        end = start + len(members)
        if k % 2 == 1:
            ax.axvspan(start - 0.5, end - 0.5, color="0.93", zorder=0)
        ax.text((start + end - 1) / 2, 108, title, ha="center", fontsize=9, style="italic")
        start = end


def _mark_best_undefended(ax, methods: dict) -> None:
    best = best_undefended(methods)
    if best is None:
        return
    row = methods[best]
    ax.axhline(row["acc_avg"], color="tab:blue", linestyle="--", linewidth=1, zorder=0.5)
    if row.get("asr_succession_avg") is not None:
        ax.axhline(row["asr_succession_avg"], color="tab:red", linestyle="--", linewidth=1)
    ax.plot(
        [],
        [],
        color="0.3",
        linestyle="--",
        label=f"best undefended merge ({best}): its ACC (blue), succession ASR (red)",
    )


def plot(results: dict, path: Path) -> None:
    """Draw the bench figure into ``path`` (a PNG)."""
    import matplotlib.pyplot as plt

    fig = draw(results)
    fig.savefig(path, dpi=130, format="png")
    plt.close(fig)
