"""What must hold of the site's tables and the PDF folder at any moment, crash or not.

Shared by the daemon, multi-instance and reliability tests: each order is either not
completed (no result rows, no mail) or completed with all its rows, its whole PDF and
exactly one mail event; nothing is ever duplicated; no half file is at a final path.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

_ORDER_ID = re.compile(r's:8:"ORDER_ID";s:\d+:"([^"]*)";')


def check_invariants(db: Any, pdf_dir: Path, *, expected_results: dict[str, int],
                     expected_pdfs: dict[str, bytes]) -> dict[str, int]:
    """Assert the invariants; return counts of completed and not completed orders."""
    orders = {r.EXTERNAL_ORDER_ID: r for r in db.rows(
        "SELECT ID, EXTERNAL_ORDER_ID, USER_ID, STATUS FROM local_lab_orders")}
    rows = Counter(r.ORDER_ID for r in db.rows("SELECT ORDER_ID FROM local_lab_results"))
    twins = db.rows("SELECT ORDER_ID, TEST_CODE, COUNT(*) AS n FROM local_lab_results "
                    "GROUP BY ORDER_ID, TEST_CODE HAVING COUNT(*) > 1")
    assert twins == [], f"duplicate result rows: {twins[:5]}"
    mails = Counter()
    for (c_fields,) in db.rows("SELECT C_FIELDS FROM b_event"):
        match = _ORDER_ID.search(c_fields)
        assert match, f"a mail event without ORDER_ID: {c_fields[:200]}"
        mails[match.group(1)] += 1
    assert all(n == 1 for n in mails.values()), \
        f"orders with several mail events: {[k for k, n in mails.items() if n > 1]}"
    done = not_done = 0
    for ext, order in orders.items():
        pdf = pdf_dir / str(order.USER_ID) / f"{ext}.pdf"
        if order.STATUS == "completed":
            done += 1
            assert rows[order.ID] == expected_results[ext], f"{ext}: {rows[order.ID]} rows"
            assert mails[ext] == 1, f"{ext}: completed without its mail event"
            assert pdf.read_bytes() == expected_pdfs[ext], f"{ext}: PDF missing or different"
        else:
            not_done += 1
            assert mails[ext] == 0, f"{ext}: a mail event for an order not completed"
            assert rows[order.ID] == 0, f"{ext}: result rows for an order not completed"
            if pdf.exists():  # moved into place just before a commit that never happened
                assert pdf.read_bytes() == expected_pdfs[ext], f"{ext}: half a PDF"
    return {"completed": done, "not_completed": not_done}


def temp_files(pdf_dir: Path) -> list[Path]:
    return sorted(pdf_dir.rglob(".*.part")) if pdf_dir.exists() else []
