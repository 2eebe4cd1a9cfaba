"""Plans from measurements: each linear's share of the output error at each precision (``sensitivity``), and
the plan a weight budget buys from those numbers (``budget_plan``)."""

from .budget import budget_bytes, budget_plan, plan_bytes
from .measure import LayerSensitivity, SensitivityReport, sensitivity

__all__ = ["LayerSensitivity", "SensitivityReport", "budget_bytes", "budget_plan", "plan_bytes", "sensitivity"]
