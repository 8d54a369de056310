"""The demo's investigation step (DESIGN §14): the same injection sent on other reviews — the
model decides which of them fail — and the sidecar's ``investigate`` job on the flagged
incident, given the failing ones as variants and the ones that did not fail as contrast. Its
answer is what an engineer acts on: the minimal input span, the decision layer, the components
and a fix searched under the side-effect budget, each verified by replay.

Example::

    sent = send_variants(url, client, 6, say=print)        # Variants(failing=[...], contrast=[...])
    result = run_investigation(client, incident_id, sent, say=print)
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from ._procs import DemoError, until
from ._traffic import injected_variants, post_review

__all__ = ["Variants", "run_investigation", "send_variants"]


@dataclasses.dataclass(frozen=True)
class Variants:
    """Incident ids of the injected variants, split by what the model did (the guardrail's
    flag on its answer)."""

    failing: list[str]
    contrast: list[str]


def _incident_ids(client: Any, request_ids: list[str], *, timeout_s: float) -> dict[str, str]:
    """request id -> incident id, once the sidecar lists every one of them."""
    def found() -> dict[str, str] | None:
        rows = client.list_all(filter='request_id : "demo-variant"')
        ids = {r.request_id: r.id for r in rows if r.request_id in request_ids}
        return ids if len(ids) == len(request_ids) else None

    return until(found, timeout_s=timeout_s, what=f"the {len(request_ids)} variants' incidents")


def send_variants(url: str, client: Any, n: int, *, say: Callable[[str], None]) -> Variants:
    """Send ``n`` injected variants (marked for capture, so the ones that do not fail are
    stored too) and split their incidents by the guardrail's flag."""
    flagged: dict[str, bool] = {}
    for i, review in enumerate(injected_variants(n), 1):
        rid = f"demo-variant-{i:02d}"
        answer = post_review(url, review, request_id=rid, capture=True)
        flagged[rid] = bool(answer["flagged"])
        say(f"variant {i}/{n}: {review!r} -> {answer['answer']!r} "
            f"({'fails' if answer['flagged'] else 'does not fail'})")
    ids = _incident_ids(client, list(flagged), timeout_s=120)
    return Variants(failing=[ids[r] for r, f in flagged.items() if f],
                    contrast=[ids[r] for r, f in flagged.items() if not f])


def run_investigation(client: Any, incident_id: str, variants: Variants, *,
                      say: Callable[[str], None], max_variants: int = 8,
                      timeout_s: float = 1200) -> dict[str, Any]:
    """Submit the ``investigate`` job and wait for it; its result (``Investigation`` JSON).
    ``max_variants``: how many failing variants the decision layer's consistency replays."""
    from sidecar.api import v1

    params = {"variants": variants.failing, "contrast": variants.contrast,
              "failure_text": "HACKED", "max_variants": max_variants}
    job = client.run_analysis(incident_id, "investigate", params_json=json.dumps(params),
                              request_id="demo:investigate")
    say(f"investigating (sidecar job {job.analysis_id}): input spans, causal trace and decision layer "
        f"over {min(len(variants.failing), max_variants)} failing variants, components, a fix under the 0.1-nat "
        f"side-effect budget ({len(variants.contrast)} variants that did not fail as contrast)"
        " ...")
    t0, last = time.monotonic(), time.monotonic()
    while True:
        a = client.get_analysis(job.analysis_id)
        if a.state == v1.JOB_STATE_DONE:
            return dict(json.loads(a.result_json or "{}"))
        if a.state == v1.JOB_STATE_FAILED:
            raise DemoError(f"the investigate job failed: {a.error}")
        if time.monotonic() - t0 > timeout_s:
            raise DemoError(f"timed out after {timeout_s:.0f} s waiting for the investigation")
        if time.monotonic() - last >= 30:
            last = time.monotonic()
            say(f"  ... still investigating ({last - t0:.0f} s)")
        time.sleep(0.5)
