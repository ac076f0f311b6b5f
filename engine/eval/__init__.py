"""Evaluation of frozen encoders: weighted kNN and linear probe on frozen features.

Library API (also used by the training loop's online kNN monitor):
  load_encoder(checkpoint, device, random_init=False) -> (ViT | ResNet, PretrainConfig)
    (engine/encoders.py, the one home of backbone loading, re-exported here)
  extract_features(encoder, data, device, batch_size, workers, progress) -> Features
  knn_classify(train_x, train_y, query_x, num_classes, k=(20, 200), temperature=0.07) -> KnnResult
  linear_probe(train_x, train_y, val_x, val_y, num_classes, epochs=100, ...) -> LinearProbeResult
  OnlineKnn(train_dir, val_dir, img_size, device).evaluate(encoder) -> {metric: value}
Command line: `python -m engine.eval knn|linear --checkpoint CKPT --train-data DIR --val-data DIR`.
"""
from engine.encoders import (
    build_encoder,
    encoder_state,
    load_encoder,
    load_encoder_with_info,
    read_checkpoint,
)
from engine.eval.features import (
    DecodedImages,
    EvalDataset,
    EvalTransform,
    Features,
    decode_images,
    decoded_nbytes,
    extract_features,
    normalize_images,
    subsample_indices,
)
from engine.eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, KnnResult, knn_classify
from engine.eval.linear import LinearProbeResult, linear_classifier, linear_probe
from engine.eval.online import OnlineKnn, labelled_folders

__all__ = [
    "DEFAULT_K", "DEFAULT_TEMPERATURE", "DecodedImages", "EvalDataset", "EvalTransform",
    "Features", "KnnResult", "LinearProbeResult", "OnlineKnn", "build_encoder", "decode_images",
    "decoded_nbytes", "encoder_state", "extract_features", "knn_classify", "labelled_folders",
    "linear_classifier", "linear_probe", "load_encoder", "load_encoder_with_info",
    "normalize_images", "read_checkpoint", "subsample_indices",
]
