"""What a zoo model predicts, defined once for calibration and evaluation alike.

Calibration optimises a prediction and evaluation scores one; if two pieces of code computed
them, a defense could be tuned on one model of the task and judged on another. This package sits
below both: ``zoo_format`` reads a zoo's manifest, ``clip`` is the closed-set zero-shot head,
``causal_lm`` the closed-answer log-likelihood of a causal LM.
"""
