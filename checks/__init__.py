"""fmcheck's built-in checks, one module per check (installed as fmcheck.checks)."""
