"""``dam-mergekit`` (one subcommand per stage of the data path) and ``mergekit-dam-yaml``.

Each stage module exposes ``add_parser(subparsers)``; the parser it adds sets ``func``. Stage modules
are imported only when the CLI starts, so ``dam-mergekit --help`` stays quick.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib import import_module

from dam_mergekit import __version__

# Stage modules that contribute subcommands, in the order of the data path.
COMMAND_MODULES = (
    "dam_mergekit.lab.zoo.cli",
    "dam_mergekit.audit.cli",
    "dam_mergekit.masks.cli",
    "dam_mergekit.calibrate.cli",
    "dam_mergekit.calibrate.estimate",
    "dam_mergekit.lab.evaluate",
    "dam_mergekit.lab.bench.cli",
    "dam_mergekit.convert.cli",
    "dam_mergekit.secure",
)


class PlainHelpFormatter(argparse.HelpFormatter):
    """Help text without the Markdown backticks the docstrings and help strings use."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(text.replace("`", ""))

    def _expand_help(self, action: argparse.Action) -> str:
        return super()._expand_help(action).replace("`", "")


def _subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser``, depth first; one without a description gets its help line."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, child in action.choices.items():
                if child in found:
                    continue  # an alias of a parser already seen
                if child.description is None and helps.get(name):
                    child.description = helps[name][0].upper() + helps[name][1:] + "."
                found += [child, *_subcommand_parsers(child)]
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dam-mergekit",
        description="Defense-Aware Merging (DAM, arXiv 2410.13910) for mergekit.",
        formatter_class=PlainHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dam-mergekit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMAND_MODULES:
        import_module(module).add_parser(sub)
    for child in _subcommand_parsers(parser):
        child.formatter_class = PlainHelpFormatter
        # -v after the subcommand too; SUPPRESS keeps a -v given before it
        child.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="log at INFO level",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    from dam_mergekit.errors import DamError

    try:
        return int(args.func(args) or 0)
    except DamError as err:
        print(f"dam-mergekit: error: {err}", file=sys.stderr)
        return 2


def mergekit_dam_yaml(argv: Sequence[str] | None = None) -> None:
    """``mergekit-yaml`` with DAM registered and the pre-flight guard on; takes every stock flag."""
    from dam_mergekit.errors import DamError
    from dam_mergekit.recipe.load import load_recipe
    from dam_mergekit.recipe.run import install_guard

    args = list(sys.argv[1:] if argv is None else argv)
    from mergekit.scripts import run_yaml

    install_guard()  # after the import: the script's own run_merge is guarded too
    try:
        recipe = next((a for a in args if not a.startswith("-")), None)
        if recipe is not None and recipe.endswith((".yml", ".yaml")):
            load_recipe(recipe)  # YAML and schema errors as one line, before mergekit's traceback
        run_yaml.main(args=args, prog_name="mergekit-dam-yaml")
    except DamError as err:
        print(f"mergekit-dam-yaml: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    raise SystemExit(main())
