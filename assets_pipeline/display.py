"""Numbers as the Dagster UI shows them: measurements rounded to the digits that mean something, on the ground
floor (the trainer and the assets both report them). Only what is shown is rounded: metrics.json, lineage.json
and the tables keep full precision, and pass/fail decisions are made on the full value."""

from __future__ import annotations

import math
import re

DIGITS = 4  # significant digits: CLIP scores 0.2193, losses 0.001235, speeds 123.5 images/s


def shown(value, digits: int = DIGITS):
    """``value`` rounded to ``digits`` significant digits if it is a finite float (an integer part is never cut:
    12345.6 shows as 12346.0); anything else (ints, bools, None, NaN, text) as it is."""
    if not isinstance(value, float) or not math.isfinite(value) or value == 0:
        return value
    return round(value, max(0, digits - 1 - math.floor(math.log10(abs(value)))))


def shown_metadata(metadata: dict) -> dict:
    """``metadata`` with every plain float value :func:`shown` (typed values, e.g. a Pipes ``{"raw_value": ...,
    "type": "float"}``, are rounded where they are made)."""
    return {k: shown(v) for k, v in metadata.items()}


# Control characters (Unicode category Cc: C0, DEL, C1) and lone surrogates (an undecodable byte of a file name).
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text: object) -> str:
    """``text`` as it may go to a terminal: control characters (ESC, BEL, NUL, newlines, ...) and lone surrogates
    escaped as repr escapes them (``\\x1b``), the rest (accents, other scripts) as is. A caption or file name is
    stored with its bytes; only what is printed is escaped, so no file can move the cursor, clear the screen or
    retitle the terminal of whoever audits it."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
