"""Runners: the only code that starts processes or talks to Docker."""
