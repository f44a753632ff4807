"""The merged model's card: what the mask file did to each expert, and what the audit said."""

from __future__ import annotations

from pathlib import Path


def card_section(mask_path: str | Path) -> str:
    """A Markdown section for the merge's README.md, from its mask file."""
    from dam_mergekit.masks.cli import summarize

    info = summarize(str(mask_path))
    audit = {e["expert"]: e for e in (info["audit"] or {}).get("experts", []) if "score" in e}
    lines = [
        "",
        "## Defense-Aware Merging",
        "",
        f"Merged through the masks of `{Path(mask_path).name}` (dam-mergekit). M1 keeps "
        f"{100 * info['m1_kept']:.1f} % of the task-vector entries.",
        "",
        "| expert | kept (M1 x M2) | pre-merge audit |",
        "|---|---:|---|",
    ]
    for e, kept in zip(info["experts"], info["kept_per_model"], strict=True):
        found = audit.get(e["model"])
        if found is None:
            verdict = "not audited"
        else:
            word = "**suspicious**" if found["flagged"] else "clean"
            verdict = f"{word} (index {found['score']:.2f}, class {found['suspected_class']})"
        lines.append(f"| `{e['model']}` | {100 * kept:.1f} % | {verdict} |")
    return "\n".join(lines) + "\n"
