"""Runnable experiments built on jaxlr: the quickstart, benchmarks, and (soon) the papers' tables.

Run modules from the root of the checkout, e.g. ``python -m experiments.quickstart``.
"""
