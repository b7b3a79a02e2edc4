"""The report page of an `imgclf fit`: the chosen model and its test metrics (measured once),
the choices made and why, every candidate with the time it took, the training settings, the
TTA and ensemble checks, and each run's learning curves. Self-contained like the run reports
(evaluate/report.py): inline images and CSS, no script, written atomically."""

from __future__ import annotations

import json
import time
from pathlib import Path

from imgclf.errors import ImgclfError
from imgclf.evaluate.report import data_uri, template
from imgclf.files import atomic_write_text
from imgclf.runs.layout import FIT_JSON, PLOTS

REPORT_HTML = "report.html"
LEADERBOARD_MD = "leaderboard.md"


def write_fit_report(folder: str | Path) -> Path:
    """Render `<fit>/report.html` from `<fit>/fit.json`; returns its path."""
    folder = Path(folder)
    try:
        fit = json.loads((folder / FIT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ImgclfError(f"cannot read {folder / FIT_JSON}: {e}") from e
    curves = []
    for c in fit.get("candidates", []):
        parts = [("screen", c.get("screen")), ("finetune", c.get("finetune"))]
        parts += [(f"round {i + 1}", r) for i, r in enumerate(c.get("rounds") or [])]
        seen = set()
        for role, record in parts:
            run = (record or {}).get("run")
            if run and run not in seen:
                seen.add(run)
                curves.append(
                    {
                        "title": f"{c['key']} · {role} · {Path(run).name}",
                        "image": data_uri(Path(run) / PLOTS / "curves.png"),
                    }
                )
    board = folder / LEADERBOARD_MD
    html = template("fit.html").render(
        fit=fit,
        chosen=fit.get("chosen"),
        test=fit.get("test") or {},
        export=fit.get("export") or {},
        curves=curves,
        leaderboard=board.read_text(encoding="utf-8") if board.is_file() else "",
        generated=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    out = folder / REPORT_HTML
    atomic_write_text(out, html)
    return out
