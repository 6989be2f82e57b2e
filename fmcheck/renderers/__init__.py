"""Renderers only read a Report (or listen to run events); they never touch execution."""
