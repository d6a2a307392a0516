"""Errors of the dashboards the user can fix: each renders as one line, and the CLI exits 2."""

from __future__ import annotations


class DashboardError(Exception):
    """Base of every dashboard error the user can fix (a sweep not in the store, too few points to fit)."""
