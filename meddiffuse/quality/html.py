"""The audit as an HTML fragment for the study report (no external CSS or scripts; escapes all text)."""

from __future__ import annotations

import base64
from html import escape

from meddiffuse.quality.result import AuditResult, FidelityScores, Section

_FIDELITY_COLUMNS = (
    ("FD", "frechet_distance", "{:.3f}"),
    ("KID", "kid", "{:.4f}"),
    ("precision", "precision", "{:.2f}"),
    ("recall", "recall", "{:.2f}"),
    ("density", "density", "{:.2f}"),
    ("coverage", "coverage", "{:.2f}"),
    ("C2ST acc.", "c2st_accuracy", "{:.2f}"),
    ("C2ST p", "c2st_p_value", "{:.3g}"),
)


def _fmt(value: float | int | None, fmt: str = "{:.3f}") -> str:
    return "–" if value is None else escape(fmt.format(value))


def _fidelity_rows(section: Section) -> str:
    rows = []
    for space, scores in section.fidelity.items():
        cells = "".join(f"<td>{_fmt(getattr(scores, attr), fmt)}</td>" for _, attr, fmt in _FIDELITY_COLUMNS)
        rows.append(f"<tr><td>{escape(section.label)}</td><td>{escape(space)}</td>"
                    f"<td>{scores.n_synthetic}/{scores.n_real}</td>{cells}{_notes(scores)}</tr>")
    return "".join(rows)


def _notes(scores: FidelityScores) -> str:
    return f"<td>{escape('; '.join(scores.notes))}</td>"


def audit_html(result: AuditResult, *, image_src: str | None = None) -> str:
    """An HTML ``<section>`` with the verdict, per-class fidelity, diversity and memorization.

    The closest-pairs image is linked from ``image_src`` when given, else embedded as a data URI when the
    result still carries it (fresh from ``run_audit`` or loaded with ``load_audit``).
    """
    status = "passed" if result.passed else "failed"
    colour = "#1a7f37" if result.passed else "#c62828"
    sections = [result.overall, *result.per_class.values()]
    head = "".join(f"<th>{escape(h)}</th>" for h, _, _ in _FIDELITY_COLUMNS)
    fidelity = "".join(_fidelity_rows(s) for s in sections)
    diversity = "".join(
        f"<tr><td>{escape(s.label)}</td><td>{_fmt(s.diversity.synthetic_ms_ssim)}</td>"
        f"<td>{_fmt(s.diversity.real_ms_ssim)}</td></tr>"
        for s in sections
    )
    memo = "".join(
        f"<tr><td>{escape(s.label)}</td><td>{s.memorization.n_flagged}/{s.memorization.n_synthetic}</td>"
        f"<td>{_fmt(s.memorization.flagged_share, '{:.1%}')}</td></tr>"
        for s in sections
    )
    thresholds = "".join(
        f"<li>{escape(name)} ({escape(t.metric)}): threshold {_fmt(t.threshold, '{:.4f}')}, "
        f"flagged {_fmt(t.flagged_share, '{:.1%}')}</li>"
        for name, t in result.memorization.spaces.items()
    )
    src = image_src
    if src is None and result.pairs_png is not None:
        src = "data:image/png;base64," + base64.b64encode(result.pairs_png).decode("ascii")
    figure = (
        f'<figure><img src="{escape(src)}" alt="closest synthetic / training pairs">'
        "<figcaption>Closest synthetic / real-training pairs (red frame: likely copy).</figcaption></figure>"
        if src else ""
    )
    return f"""<section class="meddiffuse-audit audit-{status}">
<h2>Synthetic data audit: {escape(result.synthetic.name)}</h2>
<p style="font-weight:bold;color:{colour}">{escape(result.verdict())}</p>
<p>Synthetic <code>{escape(result.synthetic.prefix)}</code> ({escape(result.synthetic.id)}) against real
<code>{escape(result.real.prefix)}</code> ({escape(result.real.id)}), {escape(result.reference_split)} split;
feature spaces: {escape(", ".join(result.feature_spaces))}.</p>
<h3>Fidelity</h3>
<table><thead><tr><th>class</th><th>space</th><th>n synth/real</th>{head}<th>notes</th></tr></thead>
<tbody>{fidelity}</tbody></table>
<h3>Diversity (mean pairwise MS-SSIM within class; lower = more diverse)</h3>
<table><thead><tr><th>class</th><th>synthetic</th><th>real</th></tr></thead><tbody>{diversity}</tbody></table>
<h3>Memorization</h3>
<p>A synthetic image is flagged as a likely copy when its distance to the nearest real training image
is below percentile {escape(f"{result.memorization.percentile:g}")} of the distances from real test images
(never trained on) to their nearest training image.</p>
<ul>{thresholds}</ul>
<table><thead><tr><th>class</th><th>flagged</th><th>share</th></tr></thead><tbody>{memo}</tbody></table>
{figure}
</section>"""


__all__ = ["audit_html"]
