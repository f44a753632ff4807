"""Execute the book's chapters on two CPU lanes and put the results where the build finds them.

``make book`` runs this before ``jupyter-book build``. The build is configured with
``execute_notebooks: cache``: a chapter whose code is in the cache is rendered from it, any
other chapter is executed by the build itself, one after another. Executed one after another,
the chapters take longer than a 2-core machine should spend on the book, so here:

1. the CLIP zoo, which most chapters read, is built first with every core (as ``make demo``
   builds it);
2. two lanes then run side by side, one process and one thread each, every step of a lane in
   order: chapter 4 then chapter 5 (which reuses the mask file chapter 4 writes), and the LLM
   zoo then the other chapters;
3. every executed notebook is stored in the build's cache. ``make book`` empties the cache first,
   so every build executes every chapter: a claim that stopped holding fails the build.

A chapter that raises stops the build with its traceback, as the build itself would.

Usage: ``python book/execute_chapters.py CACHE_DIR`` from the repository root.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
# the steps of each lane, in order: a chapter file (without .md) or "zoo:<kind>"; the longest
# lane sets the time, so keep them balanced
LANES = (
    ("ch4_inside_dam", "ch5_recipe"),
    ("zoo:llm", "ch6_llm", "ch1_merging", "ch2_succession", "ch3_transfer", "ch7_real_scale"),
)
ZOOS = {"clip": ".cache/zoo/clip-default", "llm": ".cache/zoo/llm-default"}
FIRST_ZOO = "clip"
TIMEOUT_S = 900  # per chapter, as execute.timeout in _config.yml


def chapters_in_toc() -> list[str]:
    import yaml

    toc = yaml.safe_load((BOOK / "_toc.yml").read_text(encoding="utf-8"))
    return [toc["root"], *(entry["file"] for entry in toc.get("chapters", []))]


def check_lanes() -> None:
    """Every chapter with code runs in exactly one lane (a new chapter must be placed)."""
    in_lanes = [name for lane in LANES for name in lane if not name.startswith("zoo:")]
    with_code = [
        name
        for name in chapters_in_toc()
        if "```{code-cell}" in (BOOK / f"{name}.md").read_text(encoding="utf-8")
    ]
    if sorted(in_lanes) != sorted(with_code):
        raise SystemExit(
            f"execute_chapters.py: LANES lists {sorted(in_lanes)}, the book's chapters with code "
            f"are {sorted(with_code)}; place each chapter in one lane"
        )


def build_zoo(kind: str, *, threads: int | None = None) -> None:
    """A zoo through the command line, exactly as ``dam-mergekit zoo build`` (cached)."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cli = [sys.executable, "-m", "dam_mergekit.cli", "zoo", "build"]
    start = time.perf_counter()
    done = subprocess.run([*cli, "--kind", kind, "--out", ZOOS[kind]], cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the {kind} zoo build failed (its error is above)")
    print(f"execute_chapters.py: {kind} zoo in {time.perf_counter() - start:.0f} s", flush=True)


def run_lane(names: tuple[str, ...]) -> list[tuple[str, object, float]]:
    """Execute the chapters of one lane in order; the executed notebooks with their times."""
    from jupyter_cache.executors.utils import single_nb_execution
    from myst_nb.core.read import read_myst_markdown_notebook

    done = []
    for name in names:
        if name.startswith("zoo:"):
            build_zoo(name.removeprefix("zoo:"), threads=1)
            continue
        path = BOOK / f"{name}.md"
        notebook = read_myst_markdown_notebook(path.read_text(encoding="utf-8"), path=path)
        start = time.perf_counter()
        result = single_nb_execution(
            notebook, cwd=str(BOOK), timeout=TIMEOUT_S, allow_errors=False, meta_override=True
        )
        seconds = time.perf_counter() - start
        if result.err is not None:
            raise RuntimeError(f"{path.name} failed after {seconds:.0f} s:\n{result.exc_string}")
        print(f"execute_chapters.py: {name} executed in {seconds:.0f} s", flush=True)
        done.append((name, notebook, seconds))
    return done


def main(cache_dir: str) -> int:
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    check_lanes()
    start = time.perf_counter()
    try:
        build_zoo(FIRST_ZOO)
    except RuntimeError as err:
        print(f"execute_chapters.py: {err}", file=sys.stderr)
        return 1
    cache = get_cache(cache_dir)
    with ProcessPoolExecutor(max_workers=len(LANES)) as pool:
        lanes = [pool.submit(run_lane, lane) for lane in LANES]
        try:
            results = [item for lane in lanes for item in lane.result()]
        except RuntimeError as err:
            print(f"execute_chapters.py: {err}", file=sys.stderr)
            return 1
    for name, notebook, seconds in results:
        bundle = CacheBundleIn(
            notebook, str(BOOK / f"{name}.md"), data={"execution_seconds": seconds}
        )
        cache.cache_notebook_bundle(bundle, check_validity=False, overwrite=True)
    print(f"execute_chapters.py: all chapters in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.strip().splitlines()[-1])
    raise SystemExit(main(sys.argv[1]))
