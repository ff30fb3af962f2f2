"""Pipeline wiring (kfyolo_pipeline.py) and its compile / run-local entry points (__main__.py)."""
