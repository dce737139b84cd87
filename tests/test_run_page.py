"""The run report's charts: recall in %, loss terms on a log axis when they span decades, and a
mark where the run resumed."""

from __future__ import annotations

import base64
import re

from composeae.config import load_config
from composeae.report.run_page import _spans_decades, render_report


def test_loss_terms_spanning_decades_go_on_a_log_axis():
    assert _spans_decades({"base": ([1, 2], [2.0, 0.5]), "sym": ([1, 2], [0.004, 0.002])})
    assert not _spans_decades({"base": ([1, 2], [2.0, 0.5]), "sym": ([1, 2], [0.2, 0.1])})
    assert not _spans_decades({"base": ([1], [0.0])})  # a zero cannot go on a log axis
    assert not _spans_decades({})


def test_report_draws_losses_recall_and_the_resume_mark():
    history = [{"step": s, "lr": 1e-3, "samples_per_s": 100.0, "base": 2.0 / s, "sym": 0.01 / s,
                "loss": 2.0 / s} for s in (2, 4, 6, 8)]
    history += [{"step": s, "samples_seen": 8 * s, "val/R@1": 0.1 * s, "score": 0.1 * s}
                for s in (3, 6)]
    metrics = {"step": 8, "samples_seen": 64, "best_step": 6, "resumes": 1, "restarts": [3],
               "test/R@1": 0.42}
    page = render_report(load_config(None, []), history, metrics)
    pngs = [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)
    assert "<td>42.00</td>" in page  # the table in % like the charts
