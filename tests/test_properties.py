"""Property-based tests: whatever a user passes, contract validation and config parsing either accept it or say
what is wrong in one line — never another exception, never a traceback."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiny
from fmcheck.config import SETTING_KEYS, load_settings, parse_overrides
from fmcheck.contract import FIELDS, Pipeline, coerce
from fmcheck.errors import ConfigError, PipelineError

GOOD = tiny.build()
odd_values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just(torch.nn.Linear(1, 1)), st.just(lambda *a: None), st.just(iter([1])), st.just(object()),
)
keys = st.sampled_from([*FIELDS, "stepp", "optimiser", "vae_scale", ""])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, odd_values, max_size=6), st.booleans())
def test_any_pipeline_dict_is_accepted_or_named(changes, start_from_good):
    data = {**GOOD, **changes} if start_from_good else dict(changes)
    try:
        pipeline = coerce(data)
    except PipelineError as exc:
        message = str(exc)
        assert "\n" not in message
        assert "pipeline" in message
        assert any(f"'{k}" in message for k in [*FIELDS, *data]) or "unknown pipeline key" in message
    else:
        assert isinstance(pipeline, Pipeline)


settings_values = st.one_of(st.integers(-3, 1000), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                            st.text(max_size=6), st.none(), st.lists(st.integers(), max_size=2))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from([*SETTING_KEYS, "nope"]), settings_values, max_size=5),
       st.lists(st.text(max_size=12), max_size=3))
def test_any_settings_and_overrides_are_accepted_or_named(cli, overrides):
    try:
        loaded, _ = load_settings(cli, overrides=overrides, pyproject=None)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert loaded.samples >= 1 and loaded.timeout > 0


@given(st.text(max_size=20))
def test_override_parsing_never_crashes(text):
    try:
        parsed = parse_overrides([text])
    except ConfigError as exc:
        assert "expected CHECK.THRESHOLD=VALUE" in str(exc)
    else:
        ((check_id, values),) = parsed.items()
        assert check_id and len(values) == 1
