"""Reference models that show each remedy working: each pathology beside its remedy.

Six scenarios (``activation``, ``recurrence``, ``residual``, ``initialisation``,
``normalisation``, ``clipping``), each a small CPU-friendly model on data generated in code,
trained with gradwatch attached: the pathology raises the alert it should, the remedy none.
``gradwatch demo`` runs them all.

Example::

    from gradwatch.reference import get_scenario, run_variant

    sc = get_scenario("activation")
    bad, good = run_variant(sc, sc.pathology), run_variant(sc, sc.remedy)
    print(bad.kinds, good.kinds)   # ['vanishing'] []
"""

from gradwatch.reference.runner import RunResult, run_scenario, run_variant
from gradwatch.reference.scenarios import SCENARIOS, Scenario, Variant, get_scenario, register
from gradwatch.reference.tasks import Task, copy_first_token, teacher_regression

__all__ = [
    "SCENARIOS",
    "RunResult",
    "Scenario",
    "Task",
    "Variant",
    "copy_first_token",
    "get_scenario",
    "register",
    "run_scenario",
    "run_variant",
    "teacher_regression",
]
