"""kfyolo's trainer: YOLOv5 models, data, loss, metrics and the classic epoch loop.

The package knows nothing of KFP or Kubernetes; `components/` and `k8s/` wrap it.
Importing it has no side effects (no environment writes, no thread settings).
"""

__version__ = "0.1.0"
