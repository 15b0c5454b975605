#!/usr/bin/env python
"""Render the GPU work pool's Job for a deployment, offline, as the Prefect Kubernetes worker would.

    python k8s/prefect/render_job.py --deployment gpu --flow study          # job_variables of flows/prefect.yaml
    python k8s/prefect/render_job.py --set gpu_count=2 --set image=meddiffuse:cuda --validate
    python k8s/prefect/render_job.py --write-template                       # regenerate gpu-job-template.json

Prints the Job as YAML (``--raw``: exactly as the worker submits it; default: the wire form, pod-level
completions/parallelism moved to the Job spec, see ``flows/k8s.py``). ``--validate`` checks it against the
Kubernetes 1.31 schema, strictly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from flows.k8s import (  # noqa: E402
    KUBERNETES_VERSION,
    TEMPLATE_PATH,
    build_template,
    render_job_manifest,
    validate_job,
    wire_manifest,
)


def deployment_job_variables(flow: str, name: str, prefect_file: Path) -> dict:
    import yaml
    from prefect.utilities.templating import apply_values

    data = yaml.safe_load(prefect_file.read_text())
    for d in data.get("deployments", []):
        if d.get("name") == name and d.get("entrypoint", "").endswith(f":{flow.replace('-', '_')}"):
            values = apply_values((d.get("work_pool") or {}).get("job_variables") or {}, os.environ,
                                  remove_notset=False)
            missing = sorted(set(re.findall(r"\{\{\s*\$(\w+)\s*\}\}", json.dumps(values))))
            if missing:
                raise SystemExit(f"set {', '.join(missing)} (as `make prefect-deploy` does) to render {flow}/{name}")
            return values
    raise SystemExit(f"no deployment {flow}/{name} in {prefect_file}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", default=[], metavar="VAR=JSON", help="a job variable (JSON value)")
    ap.add_argument("--flow", default="study", help="flow of --deployment (study, generate-dataset, ...)")
    ap.add_argument("--deployment", help="take the job variables of this deployment of --prefect-file")
    ap.add_argument("--prefect-file", type=Path, default=ROOT / "flows" / "prefect.yaml")
    ap.add_argument("--raw", action="store_true", help="the manifest exactly as the worker submits it")
    ap.add_argument("--validate", action="store_true", help=f"strict Kubernetes {KUBERNETES_VERSION} schema check")
    ap.add_argument("--write-template", action="store_true", help=f"rewrite {TEMPLATE_PATH.name} and exit")
    args = ap.parse_args()
    if args.write_template:
        TEMPLATE_PATH.write_text(json.dumps(build_template(), indent=2) + "\n")
        print(f"wrote {TEMPLATE_PATH}")
        return
    values = deployment_job_variables(args.flow, args.deployment, args.prefect_file) if args.deployment else {}
    for item in args.set:
        key, _, raw = item.partition("=")
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw
    job = render_job_manifest(values)
    wire = wire_manifest(job)
    if args.validate:
        validate_job(wire)
        print(f"# valid against Kubernetes {KUBERNETES_VERSION} (strict)", file=sys.stderr)
    import yaml

    print(yaml.safe_dump(job if args.raw else wire, sort_keys=False), end="")


if __name__ == "__main__":
    main()
