"""Plans from measurements: each linear's share of the output error at each precision (``sensitivity``), and
the plan a weight budget buys from those numbers (``budget_plan``); and the measures that do not compound
through a deep model (``layerwise``: error after the first blocks, per-layer SQNR)."""

from .budget import budget_bytes, budget_plan, plan_bytes
from .layerwise import LayerSQNR, LayerwiseReport, error_by_depth, layer_sqnr, layerwise
from .measure import LayerSensitivity, SensitivityReport, sensitivity

__all__ = ["LayerSQNR", "LayerSensitivity", "LayerwiseReport", "SensitivityReport", "budget_bytes", "budget_plan",
           "error_by_depth", "layer_sqnr", "layerwise", "plan_bytes", "sensitivity"]
