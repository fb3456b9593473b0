"""Sample data for the fake QLAB: plausible results, and many orders seeded at once.

``sample_results`` is a blood panel as QLAB sends it. ``seed_plan`` says which of ``count``
orders are completed; ``seed_orders`` adds them to a fake (``python -m
labsync.testing.fake_qlab --orders N`` and the benchmarks in ``bench/`` seed 100,000).
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from typing import Any

from labsync.testing.pdfs import sample_pdf
from labsync.testing.qlab_api import QlabApi

_SAMPLE_TESTS: tuple[tuple[str, str, float | str, str | None, float | None, float | None], ...] = (
    ("HGB", "Гемоглобин", 142, "г/л", 120, 160),
    ("WBC", "Лейкоциты", 6.4, "10^9/л", 4.0, 9.0),
    ("RBC", "Эритроциты", 4.7, "10^12/л", 3.8, 5.3),
    ("PLT", "Тромбоциты", 251, "10^9/л", 150, 400),
    ("GLU", "Глюкоза", 6.3, "ммоль/л", 3.9, 6.1),
    ("CHOL", "Холестерин общий", 5.2, "ммоль/л", None, 5.2),
    ("ALT", "АЛТ", 24, "Ед/л", None, 41),
    ("CREA", "Креатинин", 88, "мкмоль/л", 62, 106),
    ("TSH", "ТТГ", 2.1, "мЕд/л", 0.4, 4.0),
    ("HCV", "Антитела к HCV", "negative", None, None, None),
)


def sample_results(
    count: int = 10, *, result_date: str = "2024-05-14T10:30:00+03:00"
) -> list[dict[str, Any]]:
    """``count`` plausible QLAB results (a blood panel; codes repeat with a suffix past 10)."""
    results = []
    for i in range(count):
        code, name, value, unit, ref_min, ref_max = _SAMPLE_TESTS[i % len(_SAMPLE_TESTS)]
        abnormal = isinstance(value, float | int) and not (
            (ref_min is None or value >= ref_min) and (ref_max is None or value <= ref_max)
        )
        suffix = f"-{i // len(_SAMPLE_TESTS)}" if i >= len(_SAMPLE_TESTS) else ""
        results.append(
            {
                "code": code + suffix,
                "name": name,
                "value": value,
                "unit": unit,
                "ref_min": ref_min,
                "ref_max": ref_max,
                "abnormal": abnormal,
                "result_date": result_date,
            }
        )
    return results


def seed_plan(
    count: int, *, prefix: str = "QL-", completed_ratio: float = 0.5
) -> list[tuple[str, bool]]:
    """``(external_id, completed)`` of the orders ``seed_orders`` adds, in order.

    Completed orders are spread evenly: order ``i`` is completed when ``ceil((i+1)·r)`` steps
    past ``ceil(i·r)``, so the first is, and exactly ``ceil(count·r)`` of them are; with the
    default ½, the even ones.
    """
    if not 0 <= completed_ratio <= 1:
        raise ValueError("completed_ratio must be between 0 and 1")
    ratio = Fraction(str(completed_ratio))  # exact: no float drift over 100,000 orders
    return [
        (f"{prefix}{i + 1:06d}", math.ceil((i + 1) * ratio) > math.ceil(i * ratio))
        for i in range(count)
    ]


def seed_orders(
    fake: QlabApi,
    count: int,
    *,
    prefix: str = "QL-",
    completed_ratio: float = 0.5,
    results: int = 10,
    pdf_size: int | None = None,
) -> list[str]:
    """Add ``count`` orders (``seed_plan``): completed ones with ``results`` results and a PDF,
    the others processing.

    Without ``pdf_size`` each completed order gets its own small PDF naming it. With it, every
    completed order shares one PDF of exactly ``pdf_size`` bytes, and all share one results
    list, so 100,000 orders fit in memory (nothing in the fake changes a list in place).
    """
    shared_pdf = None if pdf_size is None else sample_pdf("Lab results", size=pdf_size)
    shared_results = json.loads(json.dumps(sample_results(results)))
    ids = []
    for i, (external_id, completed) in enumerate(
        seed_plan(count, prefix=prefix, completed_ratio=completed_ratio)
    ):
        patient = {
            "phone": f"+7999{i:07d}",
            "last_name": "Иванова",
            "first_name": "Анна",
            "birth_date": "1985-03-21",
        }
        if completed:
            pdf = shared_pdf or sample_pdf(f"Lab results {external_id}")
            fake.add_order(external_id, status="completed", results=shared_results, pdf=pdf,
                           patient=patient, copy=False)
        else:
            fake.add_order(external_id, status="processing", pdf=None, patient=patient,
                           copy=False)
        ids.append(external_id)
    return ids
