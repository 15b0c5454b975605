"""Prefect artifacts of the flows: results as a markdown table (and a table artifact), pinned model versions,
and links into the store (``file://`` for the embedded folder store, ``s3://`` for MinIO/S3).

Artifact keys form a history across runs in the Prefect UI; they may hold only lowercase letters, digits
and dashes, so ``artifact_key`` folds any name onto that alphabet.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from meddiffuse.config import Settings

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1")


def artifact_key(*parts: str) -> str:
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower())).strip("-")[:100]


def store_link(key: str, settings: Settings | None = None) -> str:
    """A URI for ``key`` in the configured store: ``file:///...`` (folder store) or ``s3://bucket/prefix/key``."""
    uri = (settings or Settings()).store_uri
    if uri.startswith("s3://"):
        return f"{uri.rstrip('/')}/{key.lstrip('/')}"
    root = Path(uri[len("file://"):] if uri.startswith("file://") else uri).resolve()
    return (root / key.lstrip("/")).as_uri()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in columns) + " |\n"
                          for r in rows)


def classifier_rows(results: Iterable[Any]) -> list[dict[str, Any]]:
    """One row per classifier from ``ClassifierResult`` objects or the study's classifier stage records."""
    rows = []
    for r in results:
        r = r.model_dump(mode="json") if hasattr(r, "model_dump") else dict(r)
        metrics = r.get("metrics") or r
        rows.append({"domain": r.get("domain"), "arch": r.get("arch"), "train_data": r.get("train_data"),
                     **{m: metrics.get(m) for m in HEADLINE}, "n_train": r.get("n_train"),
                     "pretrained": r.get("pretrained") or "scratch",
                     "model": r.get("uri") or r.get("model_uri") or r.get("prefix") or ""})
    return rows


def publish_results(key: str, title: str, rows: list[dict[str, Any]], *, extra_markdown: str = "",
                    description: str | None = None) -> None:
    """The results as a markdown artifact (a table plus ``extra_markdown``) and as a table artifact."""
    columns = list(rows[0]) if rows else ["result"]
    create_markdown_artifact(markdown=f"## {title}\n\n{markdown_table(rows, columns)}\n{extra_markdown}",
                             key=artifact_key(key), description=description or title)
    if rows:
        create_table_artifact(table=rows, key=artifact_key(key, "table"), description=description or title)


def publish_link(key: str, link: str, text: str, description: str | None = None) -> None:
    create_link_artifact(link=link, link_text=text, key=artifact_key(key), description=description or text)


def pinned_models_markdown(models: Iterable[tuple[str, str | None]]) -> str:
    """``(what, models:/name/N)`` pairs as a markdown list of pinned versions."""
    lines = [f"- {what}: `{uri}`" for what, uri in models if uri]
    return "### Pinned model versions\n\n" + "\n".join(lines) + "\n" if lines else ""
