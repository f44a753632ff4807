"""The command line reads well: every subcommand explained, no Markdown in help, -v anywhere."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
from test_mergekit_merge import init_masks, mergekit_yaml
from test_recipe_refusals import relative_recipe

from dam_mergekit.cli import _subcommand_parsers, build_parser, main


def test_every_subcommand_has_a_description_and_every_option_a_help():
    for parser in _subcommand_parsers(build_parser()):
        assert parser.description, f"{parser.prog} has no description"
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{parser.prog} {action.option_strings or action.dest}"


@pytest.mark.parametrize("command", [["bench"], ["evaluate"], ["demo"], ["zoo", "build"]])
def test_help_shows_no_backticks(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    assert text and "`" not in text


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_works_before_and_after_the_subcommand(where, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: seen.update(kw))
    argv = ["masks", "inspect", str(tmp_path / "missing.safetensors")]
    argv = ["-v", *argv] if where == "before" else [*argv, "-v"]
    main(argv)  # refused (no such file) after logging is set up
    assert seen["level"] == logging.INFO
    main(argv[1:] if where == "before" else argv[:-1])
    assert seen["level"] == logging.WARNING


def test_no_transformers_deprecation_on_a_merge(llama_models, tmp_path, monkeypatch, capsys):
    """mergekit sets config.torch_dtype; transformers 5 warned about it on every command."""
    monkeypatch.chdir(tmp_path)
    recipe = relative_recipe(tmp_path, llama_models)
    init_masks(Path("dam.yml"), Path("masks/dam.safetensors"))
    proc = mergekit_yaml(recipe, Path("out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "deprecated" not in proc.stderr + capsys.readouterr().err
