"""Render a study's results: a self-contained ``report.html`` (images inline), ``results.json``, a markdown table.

Rendering is pure: it takes the JSON-able results an experiment collected plus PNG bytes, and returns
text. No plotting library is needed; confusion matrices are shaded HTML tables.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any

TRAIN_DATA_ORDER = {"real": 0, "synthetic": 1, "mixed": 2}
# The report's leading sections, which show numbers only (no patient's image): what may leave the working folder
# as a picture of the report (bench/report_figure.py cuts at the first section not listed here).
SUMMARY, RESULTS, CONFUSION = ("Summary", "Results on unseen real test images",
                               "Confusion matrices and per-class metrics")
TEXT_ONLY_SECTIONS = (SUMMARY, RESULTS, CONFUSION)
METRIC_COLUMNS = [
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced acc."),
    ("macro_f1", "macro-F1"),
    ("auc", "AUC"),
]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _ci(row: dict[str, Any], key: str = "accuracy_ci95") -> str:
    ci = row.get(key)
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def sorted_results(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(results, key=lambda r: (r["arch"], TRAIN_DATA_ORDER.get(r["train_data"], 9)))


def tstr_ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per architecture: TSTR/TRTR and mixed/TRTR accuracy ratios (the study's headline numbers)."""
    out: dict[str, dict[str, float]] = {}
    by = {(r["arch"], r["train_data"]): r for r in results}
    for arch in sorted({r["arch"] for r in results}):
        real = by.get((arch, "real"))
        if not real or not real.get("accuracy"):
            continue
        ratios = {}
        for kind in ("synthetic", "mixed"):
            if (arch, kind) in by:
                ratios[f"{kind}/real"] = by[(arch, kind)]["accuracy"] / real["accuracy"]
        out[arch] = ratios
    return out


def markdown_table(results: list[dict[str, Any]], domain: str | None = None) -> str:
    head = ("| " + ("domain | " if domain else "")
            + "architecture | train data | accuracy (95% CI) | balanced acc. | macro-F1 | AUC | pretrained "
            + "| registered |")
    sep = "|" + "---|" * (8 if domain else 7)
    lines = [head, sep]
    for r in sorted_results(results):
        cells = [domain] if domain else []
        cells += [
            r["arch"],
            r["train_data"],
            f"{r['accuracy']:.3f} {_ci(r)}",
            _fmt(r.get("balanced_accuracy")),
            _fmt(r.get("macro_f1")),
            _fmt(r.get("auc")),
            "yes" if r.get("pretrained") else "no",
            _pinned(r.get("model_uri")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pinned(uri: str | None) -> str:
    """``name/version`` of a pinned ``models:/name/version`` URI ('' when not registered)."""
    return uri.removeprefix("models:/") if uri else ""


def png_tag(data: bytes, alt: str, width: int | None = None) -> str:
    b64 = base64.b64encode(data).decode()
    w = f' width="{width}"' if width else ""
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}"{w}>'


def confusion_html(matrix: list[list[int]], classes: list[str]) -> str:
    peak = max((max(row) for row in matrix), default=1) or 1
    rows = ["<table class='cm'><tr><th>true \\ pred</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in classes)
            + "</tr>"]
    for cls, row in zip(classes, matrix, strict=True):
        cells = "".join(
            f"<td style='background: rgba(37,99,235,{0.08 + 0.8 * v / peak:.2f})'>{v}</td>" for v in row
        )
        rows.append(f"<tr><th>{html.escape(cls)}</th>{cells}</tr>")
    return "".join(rows) + "</table>"


CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1150px;color:#111;padding:0 1rem}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0} td,th{border:1px solid #ddd;padding:.25rem .55rem;text-align:right}
th{background:#f5f5f5} td:first-child,th:first-child{text-align:left}
.cm td{min-width:3rem;text-align:center} .muted{color:#666} .fail{color:#b91c1c;font-weight:600}
.pass{color:#15803d;font-weight:600} .grid img{image-rendering:pixelated;border:1px solid #ccc}
.cards{display:flex;flex-wrap:wrap;gap:1rem} .card{border:1px solid #ddd;padding:.5rem;border-radius:6px}
.card img{image-rendering:pixelated} code{background:#f3f3f3;padding:0 .2rem}
"""


def render_html(report: dict[str, Any], images: dict[str, bytes]) -> str:
    """The whole report. ``images`` maps names used in ``report`` (grids, overlays) to PNG bytes."""
    r = report
    parts: list[str] = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>meddiffuse — {html.escape(r['name'])}</title><style>{CSS}</style></head><body>",
        f"<h1>meddiffuse study: {html.escape(r['name'])}</h1>",
        f"<p class='muted'>domain <b>{html.escape(r['domain'])}</b> · classes {html.escape(', '.join(r['classes']))}"
        f" · {html.escape(r.get('created', ''))}</p>",
    ]
    # summary
    parts.append(f"<h2>{SUMMARY}</h2><ul>")
    ds = r.get("datasets", {})
    for key, info in ds.items():
        parts.append(f"<li>{html.escape(key)}: <code>{html.escape(info.get('prefix', ''))}</code> "
                     f"id <code>{html.escape(info.get('id', ''))}</code> — {html.escape(info.get('summary', ''))}</li>")
    gen = r.get("generator")
    if gen:
        parts.append(f"<li>generator: {html.escape(gen.get('summary', ''))}</li>")
    for arch, ratios in tstr_ratios(r.get("results", [])).items():
        txt = ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items())
        parts.append(f"<li>{html.escape(arch)}: accuracy ratio {html.escape(txt)}</li>")
    audit = r.get("audit")
    if audit is not None:
        status = "<span class='pass'>PASSED</span>" if audit.get("passed") else "<span class='fail'>FAILED</span>"
        summary = str(audit.get("summary", "")).removeprefix("PASSED: ").removeprefix("FAILED: ")
        parts.append(f"<li>synthetic data audit: {status} {html.escape(summary)}</li>")
    for note in r.get("notes", []):
        parts.append(f"<li class='muted'>{html.escape(note)}</li>")
    parts.append("</ul>")
    # results table
    parts.append(f"<h2>{RESULTS}</h2><table><tr><th>architecture</th><th>train data</th>"
                 "<th>n train</th>" + "".join(f"<th>{label}</th>" for _, label in METRIC_COLUMNS)
                 + "<th>accuracy 95% CI</th><th>pretrained</th><th>registered version</th></tr>")
    for row in sorted_results(r.get("results", [])):
        parts.append(
            f"<tr><td>{html.escape(row['arch'])}</td><td>{html.escape(row['train_data'])}</td>"
            f"<td>{row.get('n_train', '')}</td>"
            + "".join(f"<td>{_fmt(row.get(k))}</td>" for k, _ in METRIC_COLUMNS)
            + f"<td>{_ci(row)}</td><td>{html.escape(str(row.get('pretrained') or 'no'))}</td>"
            + f"<td>{html.escape(_pinned(row.get('model_uri')))}</td></tr>"
        )
    parts.append("</table>")
    # per-class tables and confusion matrices
    parts.append(f"<h2>{CONFUSION}</h2><div class='cards'>")
    for row in sorted_results(r.get("results", [])):
        cm = row.get("confusion_matrix")
        if not cm:
            continue
        parts.append(f"<div class='card'><b>{html.escape(row['arch'])} · {html.escape(row['train_data'])}</b>"
                     + confusion_html(cm, r["classes"]))
        per_class = row.get("per_class") or []
        if per_class:
            parts.append("<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>n</th></tr>")
            for pc in per_class:
                parts.append(f"<tr><td>{html.escape(str(pc.get('name', '')))}</td><td>{_fmt(pc.get('precision'))}"
                             f"</td><td>{_fmt(pc.get('recall'))}</td><td>{_fmt(pc.get('f1'))}</td>"
                             f"<td>{pc.get('support', '')}</td></tr>")
            parts.append("</table>")
        parts.append("</div>")
    parts.append("</div>")
    # samples
    grids = [k for k in r.get("grids", [])]
    if grids:
        parts.append("<h2>Synthetic samples beside real examples</h2>"
                     "<p class='muted'>Per class: images generated for that class (left) beside real training "
                     "images of the class (right).</p><div class='grid'>")
        for key in grids:
            if key in images:
                parts.append(f"<p><b>{html.escape(key.rsplit('/', 1)[-1])}</b><br>{png_tag(images[key], key)}</p>")
        parts.append("</div>")
    # audit
    if r.get("audit_html"):
        parts.append(r["audit_html"])  # brings its own heading
    # explanations
    expl = r.get("explanations", [])
    if expl:
        parts.append("<h2>What the classifiers look at (LIME)</h2><p class='muted'>Top superpixels outlined; "
                     "deletion faithfulness &gt; 0 means removing them hurts the prediction more than removing "
                     "random superpixels.</p><div class='cards'>")
        for e in expl:
            img = images.get(e.get("overlay", ""))
            verdict = "right" if e.get("correct") else "wrong"
            extra = ""
            if e.get("mask_share") is not None:
                extra = f"<br>weight in lesion: {e['mask_share']:.2f}"
            parts.append(
                f"<div class='card'>{png_tag(img, e.get('overlay', ''), 160) if img else ''}<br>"
                f"<b>{html.escape(e['model'])}</b><br>true {html.escape(e['true'])} → pred "
                f"{html.escape(e['pred'])} ({verdict}, p={e.get('probability', 0):.2f})"
                f"<br>faithfulness {_fmt(e.get('faithfulness'))}{extra}</div>"
            )
        parts.append("</div>")
    parts.append("<h2>Configuration</h2><pre>" + html.escape(json.dumps(r.get("config", {}), indent=2)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
