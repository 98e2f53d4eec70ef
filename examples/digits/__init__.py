"""The digits example: a small open_clip CLIP trained from scratch with `mmcl_fast.train.grad_cached_step` at a
batch several times its chunk, on scikit-learn's handwritten digits (or your open_clip CSV), then evaluated
zero-shot. `python -m examples.digits --quick` runs it."""
