"""JUnit XML: one testcase per check; FAIL -> failure, ERROR -> error, SKIP -> skipped; measurements as properties."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from ..report import Measurement, Report
from ..verdict import Verdict


def _text(value: object) -> str:
    # ElementTree escapes markup; control characters are not valid XML 1.0 at all, so drop them.
    return "".join(ch for ch in str(value) if ch in "\t\n\r" or ord(ch) >= 0x20)


def _property(m: Measurement) -> str:
    """``value unit (expected BOUND; verdict)`` for a judged measurement; ``value unit (info: note)`` for an
    informational one, which carries no verdict (no "pass")."""
    value = f"{m.value} {m.unit}".strip()
    if m.verdict is None:
        return f"{value} (info{': ' + m.note if m.note else ''})"
    expected = f"expected {m.expected}; " if m.expected else ""
    return f"{value} ({expected}{m.verdict.value})"


def to_junit(report: Report) -> str:
    counts = {v: sum(1 for c in report.checks if c.verdict is v) for v in Verdict}
    suite = ET.Element("testsuite", {
        "name": "fmcheck",
        "tests": str(len(report.checks)),
        "failures": str(counts[Verdict.FAIL]),
        "errors": str(counts[Verdict.ERROR]),
        "skipped": str(counts[Verdict.SKIP]),
        "time": f"{sum(c.duration_s for c in report.checks):.3f}",
    })
    properties = ET.SubElement(suite, "properties")
    for key, value in report.environment.model_dump().items():
        ET.SubElement(properties, "property", {"name": f"environment.{key}", "value": _text(value)})
    for check in report.checks:
        case = ET.SubElement(suite, "testcase", {
            "classname": f"fmcheck.{_text(report.pipeline or 'pipeline')}",
            "name": _text(check.id),
            "time": f"{check.duration_s:.3f}",
        })
        props = ET.SubElement(case, "properties")
        ET.SubElement(props, "property", {"name": "verdict", "value": check.verdict.value})
        for m in check.measurements:
            ET.SubElement(props, "property", {"name": _text(m.name), "value": _text(_property(m))})
        body = "\n".join(
            [f"{m.name}: {_property(m)}" for m in check.measurements]
            + ([f"fix: {check.hint}"] if check.hint else [])
            + ([check.error] if check.error else [])
        )
        if check.verdict is Verdict.FAIL:
            ET.SubElement(case, "failure", {"message": _text(check.summary)}).text = _text(body)
        elif check.verdict is Verdict.ERROR:
            ET.SubElement(case, "error", {"message": _text(check.summary)}).text = _text(body)
        elif check.verdict is Verdict.SKIP:
            ET.SubElement(case, "skipped", {"message": _text(check.summary)})
        out = [f"WARN: {check.summary}\n{body}"] if check.verdict is Verdict.WARN else []
        # --plot figures, in the attachment convention GitLab and Jenkins show next to the test case
        out += [f"[[ATTACHMENT|{path}]]" for path in check.plots if not path.startswith("not written")]
        if out:
            ET.SubElement(case, "system-out").text = _text("\n".join(out))
    ET.indent(suite)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"
