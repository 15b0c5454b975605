"""Terminal tables for study results."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from meddiffuse.report import sorted_results, tstr_ratios


def results_table(results: list[dict[str, Any]], title: str = "") -> Table:
    table = Table(title=title or None)
    for col in ("architecture", "train data", "accuracy", "95% CI", "bal. acc.", "macro-F1", "AUC", "pretrained"):
        table.add_column(col, justify="left" if col in ("architecture", "train data", "pretrained") else "right")
    for r in sorted_results(results):
        ci = r.get("accuracy_ci95")
        table.add_row(
            r["arch"], r["train_data"], f"{r['accuracy']:.3f}", f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "",
            f"{r['balanced_accuracy']:.3f}", f"{r['macro_f1']:.3f}",
            f"{r['auc']:.3f}" if r.get("auc") is not None else "–", "yes" if r.get("pretrained") else "no",
        )
    ratios = tstr_ratios(results)
    if ratios:
        table.caption = "; ".join(
            f"{arch}: " + ", ".join(f"{k} {v:.2f}" for k, v in rs.items()) for arch, rs in ratios.items()
        )
    return table
