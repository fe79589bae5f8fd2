"""Calibration health of a served bank: are its OK/NG thresholds still to be trusted?

- ``uncalibrated``: the bank has no thresholds (it labels nothing).
- ``stale``: its thresholds predate its last update (the bank changed, the thresholds did not).
- ``drifting``: operators overruled more of its NG calls as OK (false alarms) than its
  calibration explains. The test is the one ``ocbank evaluate`` applies to normal test images
  (:func:`ocbank.model.calibration.transfer_p_value` at ``TRANSFER_SIGNIFICANCE``): the false
  alarms are OK feedback on images the service called NG, and the images at risk are every
  image this server scored with this bank version (inspections and feedback). That count
  includes defects and images scored twice, so it can only overstate the normal images, and
  the test errs towards ``ok``. Both counts are kept per bank version and start again with
  a new version and with the server.
- ``ok`` otherwise.

Each state comes with a one-line reason.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..model.calibration import TRANSFER_SIGNIFICANCE, transfer_p_value

HEALTH_STATES = ("ok", "stale", "drifting", "uncalibrated")
RECALIBRATE = ("Recalibrate the thresholds on normal images from the line: ocbank update --bank B --input NEW "
               "--calibration DIR --out B, then reload")


class FalseAlarmCounts:
    """Per served bank version (``product@sha256``: two products may serve the same file): images scored,
    and OK feedback on images it called NG."""

    def __init__(self) -> None:
        self.scored: Counter[str] = Counter()
        self.false_alarms: Counter[str] = Counter()


def calibration_health(info: dict[str, Any], stale: bool, scored: int, false_alarms: int) -> dict[str, Any]:
    """``{"state", "reason", "false_alarms", "scored"}`` for a bank described by ``info`` (BankInfo.decision and K).

    ``info``: the bank's ``decision`` block (None when uncalibrated); ``stale``: its thresholds
    predate its last update; ``scored`` / ``false_alarms``: the counts for this version.
    """
    counts = {"false_alarms": false_alarms, "scored": scored}
    decision = info.get("decision")
    if decision is None:
        return {"state": "uncalibrated", "reason": "the bank has no OK/NG thresholds; rebuild or update it with calibration.",
                **counts}
    rate, n_cal = decision.get("false_alarm_rate"), decision.get("n_images")
    if false_alarms and rate is not None and n_cal:
        n = max(scored, false_alarms)
        p = transfer_p_value(false_alarms, n, rate, n_cal)
        if p < TRANSFER_SIGNIFICANCE:
            reason = (f"operators overruled {false_alarms} NG call(s) as OK among {n} image(s) this version scored "
                      f"({100 * false_alarms / n:.1f}%) against a {100 * rate:g}% false-alarm target, more than its "
                      f"{n_cal} calibration images explain (p = {p:.1g}). {RECALIBRATE}.")
            return {"state": "drifting", "reason": reason, **counts}
    if stale:
        return {"state": "stale", "reason": f"the OK/NG thresholds were calibrated before the bank's last update. {RECALIBRATE}.",
                **counts}
    reason = f"{false_alarms} overruled false alarm(s) among {scored} image(s) scored by this version: within calibration."
    return {"state": "ok", "reason": reason, **counts}
