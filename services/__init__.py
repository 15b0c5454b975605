"""BentoML doors onto the library: ``generator`` (sampling), ``trainer`` (tasks), ``explainer`` (predict, LIME).

Each service is thin: it parses and validates a request, calls one function of ``meddiffuse.tasks`` and
formats the answer. HTTP concerns shared by all three (API key, body limit, request ids, JSON logs, error
mapping) live in ``services.common``. Start them with ``make serve`` or
``bentoml serve services.explainer:Explainer --port 3003``.
"""

import os

# Telemetry off before bentoml or mlflow is imported anywhere in the process (this tool runs offline).
for _var, _value in {
    "BENTOML_DO_NOT_TRACK": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(_var, _value)
