"""Errors that end a run before any check executes (exit code 2). Their message is one line for the user."""

from __future__ import annotations


class UsageError(Exception):
    """Bad command line, config or pipeline: printed as one line, exit code 2, traceback only with --debug."""


class PipelineError(UsageError):
    """The user's pipeline does not meet the contract (spec section 1)."""


class ConfigError(UsageError):
    """A config file or threshold override is invalid."""
