"""Detection metrics.

- ``coco``: COCO-exact bbox evaluation (pycocotools' COCOeval, vectorised) and COCO JSON loading.
- ``detection``: ``DetectionMetrics``, the validation accumulator (mAP, per-class maps, P/R).
- ``confusion``: ``ConfusionMatrix``.

Import from the submodules; this package imports nothing (``confusion`` needs torch).
"""
