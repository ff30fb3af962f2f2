"""Inference outside training: what `python -m trainer.predict` and `python -m trainer.export` share.

- `preprocess`: validation's letterbox for one image (the pixels `trainer.evaluate` feeds the model);
- `runtime`: the sessions that turn a uint8 batch into decoded predictions: PyTorch (a kfyolo or
  ultralytics checkpoint), TorchScript and ONNX Runtime; everything before and after them is shared;
- `metadata`: what an exported model says about itself (names, stride, input and output layout);
- `sources`: `--source` (file, folder, glob, .txt list, s3:// prefix) into images read once;
- `outputs`: annotated images, YOLO label files and the COCO results file of a predict run.
"""
