"""Container HEALTHCHECK: GET $HEALTHCHECK_URL (default the service's /livez) and exit 0 on 2xx.

Standard library only, so the same probe works in every image (no curl in slim images).
"""

import os
import sys
import urllib.request

URL = os.environ.get("HEALTHCHECK_URL", "http://127.0.0.1:3000/livez")
TIMEOUT_S = float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "4"))

try:
    with urllib.request.urlopen(URL, timeout=TIMEOUT_S) as response:  # noqa: S310 - URL comes from the image's env
        sys.exit(0 if 200 <= response.status < 300 else 1)
except Exception as exc:  # any failure means unhealthy
    print(f"unhealthy: {URL}: {exc}", file=sys.stderr)
    sys.exit(1)
