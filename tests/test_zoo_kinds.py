"""The zoo-kind interface: one implementation per kind that zoo.json may name."""

from __future__ import annotations

import pytest

from dam_mergekit.errors import DamError
from dam_mergekit.lab.kinds import KINDS, ZooKind, zoo_kind
from dam_mergekit.scoring.zoo_format import check_manifest


def test_every_kind_the_format_accepts_has_an_implementation():
    assert set(KINDS) == {"clip", "llm"}  # the kinds the format reader accepts
    with pytest.raises(DamError, match="kind must be 'clip' or 'llm'"):
        check_manifest({"format": "dam-mergekit-zoo", "version": 1, "kind": "vit"}, where="x")
    for name, kind in KINDS.items():
        assert zoo_kind(name) is kind and kind.name == name
        for attribute in ("summary", "adapter", "copy_tokenizer"):
            assert hasattr(kind, attribute)
        for operation in ("resolve_options", "build", "evaluate"):
            assert callable(getattr(kind, operation))
    assert ZooKind.__annotations__.keys() >= {"name", "summary", "adapter", "copy_tokenizer"}


def test_an_unknown_kind_is_refused_by_name():
    with pytest.raises(DamError, match="zoo kind must be 'clip' or 'llm', got 'vit'"):
        zoo_kind("vit")


def test_the_kinds_carry_what_the_bench_used_to_branch_on():
    assert (zoo_kind("clip").adapter, zoo_kind("llm").adapter) == ("clip", "causal_lm")
    assert (zoo_kind("clip").copy_tokenizer, zoo_kind("llm").copy_tokenizer) == (False, True)
    # the LLM kind only drops unset options: its builder fills the defaults (the cache key is
    # computed from what is given)
    assert zoo_kind("llm").resolve_options({"kind": "llm", "seed": None, "n_train": 8}) == {
        "kind": "llm",
        "n_train": 8,
    }
    assert zoo_kind("clip").resolve_options({"kind": "clip"})["expert_steps"] == 500


def test_zoo_build_offers_exactly_the_kinds():
    from dam_mergekit.cli import build_parser

    args = build_parser().parse_args(["zoo", "build", "--kind", "llm", "--out", "x"])
    assert args.kind == "llm"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["zoo", "build", "--kind", "vit", "--out", "x"])
