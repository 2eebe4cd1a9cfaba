"""The Inductor choices the lower stage changes: which row reductions it makes persistent."""

import pytest
import sympy
from torch._inductor.runtime.hints import ReductionHint

from convrot_compiler.compiler.inductor_choices import PERSISTENT_ROW_LIMIT, _choices_class, persistent_row


class _Features:
    """The two things the choice reads of Inductor's SIMDKernelFeatures."""

    def __init__(self, numel, hint=ReductionHint.INNER):
        self.reduction_numel, self._hint = numel, hint

    def get_reduction_hint(self):
        return self._hint


@pytest.mark.parametrize("numel,hint,expected", [
    (sympy.Integer(3072), ReductionHint.INNER, True),        # FLUX's LayerNorms
    (PERSISTENT_ROW_LIMIT, ReductionHint.INNER, True),
    (PERSISTENT_ROW_LIMIT + 1, ReductionHint.INNER, False),  # wider rows: Inductor's choice
    (1024, ReductionHint.INNER, False),                      # Inductor makes these persistent itself
    (sympy.Integer(3072), ReductionHint.OUTER, False),       # not a row reduction
    (sympy.Symbol("s0", positive=True, integer=True), ReductionHint.INNER, False),  # dynamic width
])
def test_rows_of_up_to_the_limit_are_persistent(numel, hint, expected):
    assert persistent_row(_Features(numel, hint)) is expected


def test_the_handler_makes_such_rows_persistent():
    assert _choices_class().should_use_persistent_reduction(_Features(sympy.Integer(3072)), False) is True


def test_anything_else_is_inductors_choice(monkeypatch):
    """Rows it does not cover, and a cooperative reduction, go to Inductor's own heuristic, with the arguments as
    Inductor passed them."""
    from torch._inductor.choices import InductorChoices

    seen = []
    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction",
                        staticmethod(lambda *a, **k: seen.append((a, k)) or False))
    choices = _choices_class()
    assert choices.should_use_persistent_reduction(_Features(sympy.Integer(8192)), False) is False
    assert choices.should_use_persistent_reduction(_Features(3072), cooperative_reduction=True) is False
    assert [(len(a), k) for a, k in seen] == [(2, {}), (1, {"cooperative_reduction": True})]
