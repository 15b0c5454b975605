"""The README's report sample: the top of a study report (summary, results, confusion matrices) as a PNG.

Renders the report of a study bench run (the path its bench/results/study-<domain>.json names) in headless
Chromium (Debian's, never a downloaded browser) and keeps the page down to the first section that is not
one of the report's text-only ones (`meddiffuse.report.TEXT_ONLY_SECTIONS`). Real patients' images never leave
the working folder: the sample grids, the audit's closest pairs and LIME show real examples, and any section
added later is cut off too unless it is listed as text-only.

    python bench/report_figure.py --domain brain-mri            # -> docs/report-sample.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meddiffuse.report import TEXT_ONLY_SECTIONS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", default="brain-mri")
    p.add_argument("--report", type=Path, help="a report.html (default: the study bench's for --domain)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "report-sample.png")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--width", type=int, default=1100)
    a = p.parse_args(argv)
    report = a.report
    if report is None:
        result = ROOT / "bench" / "results" / f"study-{a.domain}.json"
        if not result.exists():
            raise SystemExit(f"{result} not found: run `python bench/study.py --domain {a.domain}` first")
        named = json.loads(result.read_text()).get("report")
        if not named:
            raise SystemExit(f"{result} names no report: rerun `python bench/study.py --domain {a.domain}`")
        report = Path(named)
    if not report.exists():
        raise SystemExit(f"report {report} not found (the study's working folder was removed?)")
    if not Path(a.chromium).exists():
        raise SystemExit(f"{a.chromium} not found: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=a.chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": a.width, "height": 800})
            page.goto(report.resolve().as_uri())
            # the page's height down to the first heading that is not a text-only section (fails closed: a
            # page without any such heading is refused rather than shot whole)
            cut = page.evaluate("""(safe) => {
                const hit = [...document.querySelectorAll('h2')].find(h => !safe.includes(h.textContent.trim()));
                return hit ? Math.floor(hit.getBoundingClientRect().top + window.scrollY) - 8 : null;
            }""", list(TEXT_ONLY_SECTIONS))
            if cut is None:
                raise SystemExit(f"{report}: no section after the text-only ones {list(TEXT_ONLY_SECTIONS)}; "
                                 "not a meddiffuse report? nothing written")
            a.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = a.out.with_name(f".{a.out.name}.part.png")
            page.screenshot(path=str(tmp), clip={"x": 0, "y": 0, "width": a.width, "height": max(cut, 100)},
                            full_page=True)
            tmp.replace(a.out)  # a failed shot never leaves half a picture where the README points
        finally:
            browser.close()
    print(f"-> {a.out} ({a.width} x {cut} px from {report})")


if __name__ == "__main__":
    sys.exit(main())
