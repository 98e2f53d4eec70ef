"""Runnable examples of mmcl_fast's public API, run from a clone of the repository (`python -m examples.digits`)."""
