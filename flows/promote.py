"""The ``promote`` flow: move an alias (``champion``) to a challenger only when it beats the alias's holder on
the same real test split (``meddiffuse.tasks.promote_if_better``: a paired bootstrap on identical images;
refused when the two were scored on different test sets). The evidence is tagged on the challenger.

If someone moves the alias while the comparison runs, the library raises ``AliasMoved``; the task's retry
then decides again against the new holder, and the flow ends Failed if it keeps moving.
"""

from __future__ import annotations

from prefect import flow

from flows import tasks as t
from flows.artifacts import artifact_key, markdown_table
from meddiffuse.config import Settings


@flow(name="promote", flow_run_name="promote-{challenger}")
def promote(challenger: str, test_set: str, alias: str = "champion", metric: str = "balanced_accuracy",
            min_delta: float = 0.0, bootstrap: int = 1000, seed: int = 0):
    """Promote ``challenger`` (``models:/name/N`` or ``name/N``) to ``alias`` if it is better on ``test_set``'s
    real test split (a store prefix)."""
    from prefect.artifacts import create_markdown_artifact

    decision = t.configured(t.promote_if_better, Settings())(challenger, test_set, alias=alias, metric=metric,
                                                              min_delta=min_delta, bootstrap=bootstrap, seed=seed)
    row = {"model": decision.name, "challenger": decision.challenger, "champion before": decision.champion,
           "promoted": decision.promoted, "metric": decision.metric, "test set": decision.test_set}
    create_markdown_artifact(
        markdown=f"## Promotion of {decision.name}/{decision.challenger} to `{decision.alias}`\n\n"
                 f"{markdown_table([row], list(row))}\n**{'promoted' if decision.promoted else 'kept'}**: "
                 f"{decision.reason}\n",
        key=artifact_key("promotion", decision.name), description=decision.reason[:500])
    return decision
