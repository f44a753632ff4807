"""The backdoor lab: model zoos, their evaluation, the bench and the claims they check.

The lab uses the product (recipes, masks, calibration, scoring); the product never imports the
lab (tests/test_import_layers.py), except ``dam_mergekit.cli``, which lists the lab's subcommands.
"""
