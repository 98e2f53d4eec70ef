"""Integrations with training frameworks: `open_clip_train` (python -m mmcl_fast.integrations.open_clip_train)."""
