"""Recurring-billing worker for the Tpaga card API."""

__version__ = "0.1.0"
