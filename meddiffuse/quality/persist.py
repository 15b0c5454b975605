"""Audit results in the object store, beside the synthetic dataset they judge.

Layout: ``<synthetic prefix>/audit/closest-pairs.png`` then ``<synthetic prefix>/audit/audit.json``.
Each ``put`` is atomic and the JSON goes last, naming the PNG: a reader that finds ``audit.json``
finds a complete audit. The JSON records the synthetic dataset id, so an audit left over from a
dataset that was since re-sampled under the same prefix is recognised as stale.
``save_audit(result, store, prefix)`` and ``load_audit(store, prefix)`` take the same folder.
"""

from __future__ import annotations

from meddiffuse.data.dataset import Dataset
from meddiffuse.quality.result import AuditResult
from meddiffuse.store.base import ObjectNotFound, ObjectStore

AUDIT_FOLDER = "audit"
AUDIT_JSON = "audit.json"
PAIRS_PNG = "closest-pairs.png"


def audit_prefix(synthetic_prefix: str) -> str:
    return f"{synthetic_prefix.rstrip('/')}/{AUDIT_FOLDER}"


def save_audit(result: AuditResult, store: ObjectStore, prefix: str | None = None) -> str:
    """Write the pairs PNG (if rendered) and then ``audit.json`` under ``prefix``; returns the JSON key.

    ``prefix`` defaults to ``<synthetic prefix>/audit``. ``result.artifacts`` records the keys.
    """
    folder = (prefix or audit_prefix(result.synthetic.prefix)).rstrip("/")
    if not folder:
        raise ValueError("prefix must name a folder in the store")
    json_key = f"{folder}/{AUDIT_JSON}"
    if result.pairs_png is not None:
        png_key = f"{folder}/{PAIRS_PNG}"
        store.put(png_key, result.pairs_png)
        result.artifacts["closest_pairs_png"] = png_key
    result.artifacts["audit_json"] = json_key
    store.put_text(json_key, result.model_dump_json(indent=2))
    return json_key


class StaleAudit(ObjectNotFound):
    """The saved audit judged another version of the synthetic dataset (re-sampled since)."""


def load_audit(store: ObjectStore, prefix: str, *, synthetic: Dataset | None = None) -> AuditResult:
    """The audit saved under ``prefix`` (the folder ``save_audit`` wrote; see ``audit_prefix``).

    Raises ObjectNotFound when there is none, and StaleAudit (an ObjectNotFound) when ``synthetic`` is
    given and the audit judged an earlier version of it.
    """
    key = f"{prefix.rstrip('/')}/{AUDIT_JSON}"
    try:
        raw = store.get(key)
    except ObjectNotFound:
        raise ObjectNotFound(f"no audit at {key!r} in {store.uri} (run `meddiffuse audit` first)") from None
    result = AuditResult.model_validate_json(raw)
    if synthetic is not None and result.synthetic.id != synthetic.id:
        raise StaleAudit(
            f"the audit at {key!r} judged dataset {result.synthetic.id}, but {synthetic.prefix!r} is now "
            f"{synthetic.id}: audit it again"
        )
    png_key = result.artifacts.get("closest_pairs_png")
    if png_key and store.exists(png_key):
        result._pairs_png = store.get(png_key)
    return result


__all__ = ["AUDIT_FOLDER", "AUDIT_JSON", "PAIRS_PNG", "StaleAudit", "audit_prefix", "load_audit", "save_audit"]
