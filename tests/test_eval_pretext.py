"""The label-free pretext check's metrics (engine/eval/pretext.py): AP and recall on hand-made
detections whose values are worked out here, and the CLI's one-line errors."""
from __future__ import annotations

import math

import pytest
import torch

from engine.eval.pretext import average_precision, score_detections


def chunk(pred, scores, targets, counts):
    return {"pred_boxes": torch.tensor(pred, dtype=torch.float32),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "target_boxes": torch.tensor(targets, dtype=torch.float32),
            "num_targets": torch.tensor(counts)}


def test_perfect_detections_score_one():
    boxes = [[[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.8]]]
    result = score_detections([chunk(boxes, [[0.9, 0.8]], boxes, [2])])
    assert result.ap50 == pytest.approx(1.0) and result.ap75 == pytest.approx(1.0)
    assert result.recall[1] == pytest.approx(0.5) and result.recall[10] == pytest.approx(1.0)
    assert result.mean_best_iou == pytest.approx(1.0)


def test_ap_of_a_known_ranking():
    """Two images, 3 targets. Ranked predictions: hit (0.9), miss (0.8), hit (0.7), duplicate of
    the first hit (0.6, a false positive: its target is taken), hit (0.5).
    precision/recall: (1, 1/3), (1/2, 1/3), (2/3, 2/3), (2/4, 2/3), (3/5, 1).
    Envelope from the right: 1, 2/3, 2/3, 3/5, 3/5 -> AP = 1/3·1 + 1/3·2/3 + 1/3·3/5."""
    a, b, c = [0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7], [0.3, 0.0, 0.6, 0.3]
    far, tiny = [0.8, 0.8, 0.95, 0.95], [0.0, 0.0, 0.01, 0.01]
    image1 = chunk([[a, far, a, b]], [[0.9, 0.8, 0.6, 0.5]], [[a, b]], [2])
    # image 2's zero-score prediction comes last and only adds a false positive
    image2 = chunk([[c, tiny]], [[0.7, 0.0]], [[c]], [1])
    result = score_detections([image1, image2])
    assert result.ap50 == pytest.approx(1 / 3 + 2 / 9 + 1 / 5)
    assert result.targets == 3 and result.images == 2
    assert result.recall[1] == pytest.approx(2 / 3)      # a (image 1) and c (image 2)


def test_iou_threshold_separates_ap50_from_ap75():
    target = [0.0, 0.0, 1.0, 1.0]
    shifted = [0.0, 0.0, 1.0, 0.65]                        # IoU 0.65 with the target
    result = score_detections([chunk([[shifted]], [[0.5]], [[target]], [1])])
    assert result.ap50 == pytest.approx(1.0) and result.ap75 == 0.0
    assert result.mean_best_iou == pytest.approx(0.65)


def test_images_without_targets_only_add_false_positives():
    box = [0.2, 0.2, 0.5, 0.5]
    empty = chunk([[box]], [[0.99]], [[[0.0, 0.0, 0.0, 0.0]]], [0])
    hit = chunk([[box]], [[0.5]], [[box]], [1])
    result = score_detections([empty, hit])
    assert result.targets == 1
    assert result.ap50 == pytest.approx(0.5)               # precision 1/2 at recall 1
    assert math.isnan(average_precision([torch.tensor([0.3])], [torch.zeros(1, 0)], 0.5, 0))


def test_pretext_task_refuses_a_method_without_a_detector(tmp_path, capsys):
    from engine.eval.__main__ import main

    code = main(["pretext", "--random-init", "--preset", "mocov2-demo-cpu", "--val-data",
                 str(tmp_path), "--device", "cpu", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trains no detector" in err[0]
