"""JUnit XML: one testcase per finding that did not pass, one per check without one; FAIL -> failure, ERROR -> error,
SKIP (and an ignored finding) -> skipped; measurements as properties."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from ..findings import counts
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


def _case(suite: ET.Element, classname: str, name: str, time: float, verdict: Verdict) -> ET.Element:
    case = ET.SubElement(suite, "testcase", {"classname": classname, "name": _text(name), "time": f"{time:.3f}"})
    props = ET.SubElement(case, "properties")
    ET.SubElement(props, "property", {"name": "verdict", "value": verdict.value})
    return case


def _outcome(case: ET.Element, verdict: Verdict, message: str, body: str) -> None:
    """FAIL -> failure, ERROR -> error, SKIP -> skipped; a WARN is a passing test case whose system-out says it."""
    if verdict is Verdict.FAIL:
        ET.SubElement(case, "failure", {"message": _text(message)}).text = _text(body)
    elif verdict is Verdict.ERROR:
        ET.SubElement(case, "error", {"message": _text(message)}).text = _text(body)
    elif verdict is Verdict.SKIP:
        ET.SubElement(case, "skipped", {"message": _text(message)})


def to_junit(report: Report) -> str:
    """One test case per finding that did not pass (``<check>`` class, the finding's code as the name), so a CI
    dashboard tracks each cause on its own; one per check that has none (its PASS, SKIP or crash); an ignored
    finding, or one another check's finding covers, is a skipped test case. Measurements are the properties of their check's cases."""
    classname = f"fmcheck.{_text(report.pipeline or 'pipeline')}"
    suite = ET.Element("testsuite", {"name": "fmcheck"})
    properties = ET.SubElement(suite, "properties")
    for key, value in report.environment.model_dump().items():
        ET.SubElement(properties, "property", {"name": f"environment.{key}", "value": _text(value)})
    counted = {v: 0 for v in Verdict}
    for check in report.checks:
        measurements = "\n".join(f"{m.name}: {_property(m)}" for m in check.measurements)
        shown = [f for f in check.findings if f.verdict in (Verdict.FAIL, Verdict.ERROR, Verdict.WARN)]
        if not any(counts(f) for f in shown):  # the check's own case: PASS, SKIP, a crash, or all ignored
            verdict = check.verdict
            case = _case(suite, f"{classname}.{check.id}", check.id, check.duration_s, verdict)
            _add_properties(case, check)
            body = "\n".join(x for x in (measurements, f"fix: {check.hint}" if check.hint else "", check.error or "")
                             if x)
            _outcome(case, verdict, check.summary, body)
            counted[verdict] += 1
            _system_out(case, check, [])
        for finding in shown:
            verdict = finding.verdict if counts(finding) else Verdict.SKIP
            case = _case(suite, f"{classname}.{check.id}", finding.code, 0.0, verdict)
            _add_properties(case, check)
            message = finding.message
            if finding.ignored:
                message = f"ignored (--ignore {finding.code}): {message}"
            elif finding.covered_by:
                message = f"covered by {finding.covered_by} (the same cause): {message}"
            body = "\n".join(x for x in (f"fix: {finding.fix}" if finding.fix else "", measurements, check.error or "")
                             if x)
            _outcome(case, verdict, message, body)
            counted[verdict] += 1
            _system_out(case, check, [f"WARN: {finding.message}\n{body}"] if verdict is Verdict.WARN else [])
    suite.set("tests", str(sum(counted.values())))
    suite.set("failures", str(counted[Verdict.FAIL]))
    suite.set("errors", str(counted[Verdict.ERROR]))
    suite.set("skipped", str(counted[Verdict.SKIP]))
    suite.set("time", f"{sum(c.duration_s for c in report.checks):.3f}")
    ET.indent(suite)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def _add_properties(case: ET.Element, check) -> None:
    props = case.find("properties")
    for m in check.measurements:
        ET.SubElement(props, "property", {"name": _text(m.name), "value": _text(_property(m))})


def _system_out(case: ET.Element, check, out: list[str]) -> None:
    # --plot figures, in the attachment convention GitLab and Jenkins show next to the test case
    out = out + [f"[[ATTACHMENT|{path}]]" for path in check.plots if not path.startswith("not written")]
    if out:
        ET.SubElement(case, "system-out").text = _text("\n".join(out))
