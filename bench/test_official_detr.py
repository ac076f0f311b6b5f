"""bench/official_detr.py (the official UP-DETR and DETReg steps beside ours) on a CPU: the harness's
pieces (arguments, the shared batch, timing, the JSON and its report), our side at the smoke size,
a missing official folder recorded (not a traceback), and -- where the official code is present
(`bash bench/carry_official_detr.sh` puts it into the ignored .official/; never committed) -- its
arguments, the MSDeformAttn build patches on its sources, and, with torchvision and CUDA (or
DENSESIM_OFFICIAL_CPU=1), the whole comparison at the smoke size in subprocesses. A plain test file;
the GPU measurement is `python -m bench.official_detr` in bench/gpu_suite.sh."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.official_detr import (
    MIN_PART_SECONDS,
    SIZES,
    TimedBatches,
    _finish_build,
    as_benchmark,
    bar_summary,
    checksum,
    compat_patches,
    detreg_args,
    fit_steps,
    function_from_file,
    load_msda,
    main,
    make_batch,
    official_inputs,
    official_path,
    our_inputs,
    parse_args,
    plan_parts,
    run_ours,
    torchvision_problem,
    updetr_args,
)
from bench.report import render

UPDETR, DETREG = official_path("updetr"), official_path("detreg")
TORCHVISION = torchvision_problem()
needs_updetr = pytest.mark.skipif(UPDETR is None, reason="no official UP-DETR checkout "
                                  "(.official/up-detr): run bash bench/carry_official_detr.sh")
needs_detreg = pytest.mark.skipif(DETREG is None, reason="no official DETReg checkout "
                                  "(.official/DETReg): run bash bench/carry_official_detr.sh")
CPU = torch.device("cpu")


# ------------------------------------------------------------------ arguments and sizes
def test_arguments(tmp_path):
    args = parse_args(["--json", str(tmp_path / "o.json"), "--device", "cpu"])
    assert args.smoke and (args.steps, args.warmup, args.ours) == (2, 1, "reference")
    assert args.methods == "updetr,detreg" and args.budget == 150
    args = parse_args(["--json", "o.json", "--device", "cuda", "--ours", "fused,fused_fp32",
                       "--methods", "detreg", "--budget", "90"])
    assert not args.smoke and (args.steps, args.warmup) == (8, 2) and args.budget == 90
    worker = parse_args(["--worker", "updetr:official", "--part-json", "p.json", "--device", "cpu"])
    assert worker.worker == "updetr:official" and not worker.smoke    # the orchestrator passes it
    for bad in (["--json", "o", "--ours", "compiled"], ["--json", "o", "--methods", "pixpro"],
                ["--device", "cpu"], ["--worker", "updetr:fast", "--part-json", "p"],
                ["--worker", "updetr:fused"], ["--json", "o", "--steps", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_sizes_are_the_recipes():
    from engine.methods.detreg import DETRegHyper
    from engine.methods.updetr import UPDETRHyper
    from engine.presets import preset_config

    updetr, detreg = SIZES[("updetr", "recipe")], SIZES[("detreg", "recipe")]
    u, d = UPDETRHyper(), DETRegHyper()
    assert (updetr.img, updetr.batch, updetr.backbone) == (448, 32, "resnet50")
    assert (updetr.queries, updetr.boxes, updetr.patch_px, updetr.hidden, updetr.ffn) == (
        u.num_queries, u.num_patches, u.patch_size, u.hidden_dim, u.dim_feedforward)
    assert (updetr.enc_layers, updetr.dec_layers, updetr.nheads) == (6, 6, 8) and u.pre_norm
    assert (detreg.img, detreg.batch, detreg.queries, detreg.boxes, detreg.levels) == (
        448, 24, d.num_queries, d.max_boxes, d.num_feature_levels)
    assert (detreg.hidden, detreg.ffn, detreg.patch_px) == (d.hidden_dim, d.dim_feedforward,
                                                             d.crop_size)
    for method, size in (("updetr", updetr), ("detreg", detreg)):
        cfg = preset_config(f"{method}-r50")
        assert (cfg.img_size, cfg.batch_size, cfg.backbone) == (size.img, size.batch, size.backbone)
    smoke = SIZES[("updetr", "smoke")]
    # the release opens its group mask in a loop over query_per_patch: Q = P² keeps it whole
    assert smoke.queries == smoke.boxes ** 2 and updetr.queries == updetr.boxes ** 2


def test_parts_order():
    official = {"updetr": Path("u"), "detreg": Path("d")}
    assert plan_parts(["updetr", "detreg"], ["fused"], official) == [
        "updetr:official", "updetr:fused", "detreg:fused", "detreg:official"]
    assert plan_parts(["detreg"], ["fused", "reference"], {"detreg": None}) == [
        "detreg:fused", "detreg:reference"]


# ------------------------------------------------------------------ the shared batch
def test_random_boxes_follow_selfdet():
    batch = make_batch("updetr", SIZES[("updetr", "recipe")])
    boxes, side = batch["boxes"], batch["img"]
    assert boxes.shape == (32, 10, 4) and batch["images"].shape == (32, 3, 448, 448)
    sides = boxes[..., 2:] - boxes[..., :2]
    assert torch.equal(boxes, boxes.round())
    assert (sides >= 8).all() and (sides <= side - 8).all()
    assert (boxes[..., :2] >= 0).all() and (boxes[..., 2:] <= side - 1).all()   # x <= S - w - 1


@pytest.mark.parametrize("method", ["updetr", "detreg"])
def test_batch_builder_gives_both_sides_identical_inputs(method):
    from engine.methods.updetr import patch_targets

    size = SIZES[(method, "smoke")]
    batch, again = make_batch(method, size), make_batch(method, size)
    assert torch.equal(batch["images"], again["images"]) and torch.equal(batch["boxes"], again["boxes"])
    assert checksum(batch) == checksum(again)
    theirs = official_inputs(batch, size, CPU)
    ours, boxes = our_inputs(batch, CPU)
    assert torch.equal(theirs["images"], ours["view1"]) and torch.equal(boxes, batch["boxes"])
    assert not theirs["mask"].any() and theirs["mask"].shape == (size.batch, size.img, size.img)
    expected = patch_targets(batch["boxes"], size.img)       # our criterion's targets
    for b, target in enumerate(theirs["targets"]):
        assert torch.allclose(target["boxes"], expected["boxes"][b])
        assert torch.equal(target["labels"], torch.ones(size.boxes, dtype=torch.int64))
        assert target["size"].tolist() == [size.img, size.img]
    assert theirs["patches"].shape == (size.batch, size.boxes, 3, size.patch_px, size.patch_px)
    x1, y1, x2, y2 = batch["boxes"][1, 2].long().tolist()     # one crop, by hand
    crop = torch.nn.functional.interpolate(batch["images"][1:2, :, y1:y2, x1:x2],
                                           size=(size.patch_px,) * 2, mode="bilinear",
                                           align_corners=False, antialias=True)[0]
    assert torch.allclose(theirs["patches"][1, 2], crop)
    if method == "detreg":
        assert torch.equal(ours["proposals"][:, 0], boxes) and torch.equal(ours["proposals"][:, 1], boxes)
        assert (ours["proposal_visible"] == 1).all()
        assert torch.equal(theirs["targets"][0]["patches"], theirs["patches"][0])
    else:
        assert set(ours) == {"view1"}


# ------------------------------------------------------------------ timing and the JSON
def test_timed_batches_time_whole_steps_and_give_fresh_batches():
    made = []
    data = TimedBatches(lambda: made.append(1) or {"k": len(made)}, 3)
    assert len(data) == 3
    seen = []
    for item in data:
        seen.append(item["k"])
        time.sleep(0.01)
    assert seen == [1, 2, 3]
    seconds = data.step_seconds()
    assert len(seconds) == 3 and all(s >= 0.009 for s in seconds)
    assert fit_steps(8, 1.0, None) == 8
    assert fit_steps(8, 1.0, time.time() + 5.0) == 2               # at least two
    assert fit_steps(8, 0.5, time.time() + 6.4) == 6


def _result(method, variant, img_per_s, implementation, precision, size="recipe", batch=32):
    return {"seconds": [batch / img_per_s] * 3, "median": batch / img_per_s,
            "img_per_s": img_per_s, "step_ms": 1e3 * batch / img_per_s, "batch": batch,
            "method": method, "variant": variant, "implementation": implementation,
            "size": size, "precision": precision}


def test_results_render_with_a_vs_official_column(tmp_path):
    benches = [as_benchmark(_result("updetr", "official", 100.0, "official", "fp32")),
               as_benchmark(_result("updetr", "fused", 400.0, "densesim", "bf16")),
               as_benchmark(_result("detreg", "official", 30.0, "official", "fp32", batch=24)),
               as_benchmark(_result("detreg", "fused", 60.0, "densesim", "bf16", batch=24))]
    assert benches[1]["name"] == "official_detr_step[updetr-recipe-fused]"
    assert "seconds" not in benches[0]["extra_info"] and benches[0]["stats"]["rounds"] == 3
    lines = bar_summary(benches).splitlines()
    assert len(lines) == 2 and "= 4.00x (meets the 3x bar)" in lines[0]
    assert lines[1].startswith("bar: DETReg") and "= 2.00x (below the 3x bar)" in lines[1]
    path = tmp_path / "official_detr.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benches}))
    text = render([path])
    assert "## official_detr" in text
    row = next(line for line in text.splitlines() if "[updetr-recipe-fused]" in line)
    assert "4.00×" in row


# ------------------------------------------------------------------ our side, a missing folder
def test_our_detreg_step_runs_at_the_smoke_size():
    result = run_ours("detreg", "smoke", CPU, "reference", warmup=1, steps=1, deadline=None)
    size = SIZES[("detreg", "smoke")]
    assert result["precision"] == "fp32" and result["batch"] == size.batch
    assert result["img_per_s"] > 0 and len(result["seconds"]) == 1
    assert set(result["backends"].values()) == {"reference"}
    assert result["inputs"] == checksum(make_batch("detreg", size))
    assert result["hyper"]["num_queries"] == size.queries and result["params_trainable"] > 0


def test_missing_official_folder_is_recorded_and_ours_still_runs(tmp_path, monkeypatch):
    """No .official: a clear 'skipped' entry naming the carry script, no traceback; our UP-DETR step
    runs at the smoke size in its own process, and the JSON renders."""
    monkeypatch.setenv("DENSESIM_OFFICIAL_UPDETR", str(tmp_path / "nowhere"))
    out = tmp_path / "official_detr.json"
    code = main(["--json", str(out), "--device", "cpu", "--methods", "updetr", "--budget", "120"])
    data = json.loads(out.read_text())
    reason = data["failures"]["updetr official"]
    assert reason.startswith("skipped: no official UP-DETR checkout at")
    assert "bash bench/carry_official_detr.sh" in reason and "Traceback" not in reason
    assert code == 0, data["failures"]
    (bench,) = data["benchmarks"]
    info = bench["extra_info"]
    assert (info["method"], info["variant"], info["size"]) == ("updetr", "reference", "smoke")
    assert info["img_per_s"] > 0 and info["inputs"] == checksum(
        make_batch("updetr", SIZES[("updetr", "smoke")]))
    assert data["version"] == "bench.official_detr" and data["bar"] == ""
    assert "official_detr_step[updetr-smoke-reference]" in render([out])


def test_without_the_extension_the_official_pytorch_path_is_said():
    shims = []
    saved = sys.modules.pop("MultiScaleDeformableAttention", None)
    try:
        info = load_msda(Path("."), {"ok": False, "error": "nvcc failed"}, CPU, shims)
        assert info["backend"] == "pytorch_fallback" and info["fallback_reason"] == "no CUDA device"
        assert "ms_deform_attn_core_pytorch" in shims[0]
        assert "MultiScaleDeformableAttention" in sys.modules
    finally:
        sys.modules.pop("MultiScaleDeformableAttention", None)
        if saved is not None:
            sys.modules["MultiScaleDeformableAttention"] = saved


def test_the_background_build_is_read_or_stopped_in_time(tmp_path):
    """DETReg's official part waits for the MSDeformAttn build only while its own minimum is left;
    a finished build's record is read, a late one is stopped and said so."""
    record, log = tmp_path / "build.json", tmp_path / "build.log"
    log.write_text("ninja: done\n")
    write = ("import json, sys; open(sys.argv[1], 'w').write(json.dumps("
             "{'ok': True, 'so': 'x.so', 'seconds': 1.5}))")
    proc = subprocess.Popen([sys.executable, "-c", write, str(record)], start_new_session=True)
    info = _finish_build((proc, time.time(), log), record, time.time() + 2 * MIN_PART_SECONDS + 60)
    assert info["ok"] and info["so"] == "x.so" and "ninja: done" in info["log_tail"]
    assert json.loads(record.read_text())["ok"]
    late = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            start_new_session=True)
    started = time.time()
    info = _finish_build((late, started, log), tmp_path / "none.json",
                         time.time() + 2 * MIN_PART_SECONDS + 1)
    assert not info["ok"] and "did not finish" in info["error"] and late.poll() is not None
    assert time.time() - started < 20


# ------------------------------------------------------------------ with the official code
@needs_updetr
def test_official_updetr_arguments_are_its_pretraining_command():
    args = updetr_args(UPDETR, SIZES[("updetr", "recipe")], CPU)
    assert (args.num_queries, args.num_patches, args.batch_size, args.backbone) == (100, 10, 32, "resnet50")
    assert args.pre_norm and args.feature_recon and args.fre_cnn and args.lr_backbone == 0
    assert (args.hidden_dim, args.enc_layers, args.dec_layers, args.dim_feedforward) == (256, 6, 6, 2048)
    assert (args.lr, args.weight_decay, args.clip_max_norm, args.dataset_file) == (1e-4, 1e-4, 0.1, "ImageNet")
    assert (args.set_cost_class, args.set_cost_bbox, args.set_cost_giou, args.eos_coef) == (1, 5, 2, 0.1)
    engine = function_from_file(UPDETR / "engine.py", "train_one_epoch",
                                {"torch": torch, "Iterable": object})
    assert "CocoEvaluator" not in engine.__globals__       # its evaluation imports are not run


@needs_detreg
def test_official_detreg_arguments_are_its_top30_config():
    args = detreg_args(DETREG, SIZES[("detreg", "recipe")], CPU)
    assert (args.model, args.num_queries, args.batch_size, args.max_prop) == ("deformable_detr", 300, 24, 30)
    assert args.object_embedding_loss and args.obj_embedding_head == "intermediate"
    assert (args.lr_backbone, args.num_feature_levels, args.dim_feedforward) == (0, 4, 1024)
    assert not args.with_box_refine and not args.two_stage and args.load_backbone == "swav"
    assert (args.lr, args.lr_linear_proj_mult, args.clip_max_norm, args.cls_loss_coef) == (2e-4, 0.1, 0.1, 2)


@needs_detreg
def test_msdeformattn_build_patches(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(DETREG / "models" / "ops" / "src", src)
    old = tmp_path / "old-torch"                      # THC and the deprecated overload present
    (old / "THC").mkdir(parents=True)
    (old / "THC" / "THCAtomics.cuh").write_text("")
    (old / "ATen").mkdir()
    (old / "ATen" / "Dispatch.h").write_text("scalar_type(const at::DeprecatedTypeProperties& t)")
    assert compat_patches(src, old) == []
    new = tmp_path / "new-torch"
    (new / "ATen").mkdir(parents=True)
    (new / "ATen" / "Dispatch.h").write_text("scalar_type(at::ScalarType s)")
    patches = compat_patches(src, new)
    assert len(patches) == 2 and "THC" in patches[0] and "(2x;" in patches[1]
    cu = (src / "cuda" / "ms_deform_attn_cuda.cu").read_text()
    assert "value.type()," not in cu and cu.count("AT_DISPATCH_FLOATING_TYPES(value.scalar_type(),") == 2
    assert "<ATen/cuda/Atomic.cuh>" in (src / "cuda" / "ms_deform_im2col_cuda.cuh").read_text()
    assert compat_patches(src, new) == []              # idempotent
    assert (DETREG / "models" / "ops" / "src" / "cuda" / "ms_deform_attn_cuda.cu").read_text() != cu


@needs_updetr
@needs_detreg
@pytest.mark.skipif(TORCHVISION is not None, reason=f"the official code needs torchvision: {TORCHVISION}")
@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("DENSESIM_OFFICIAL_CPU") != "1",
                    reason="no CUDA device (DENSESIM_OFFICIAL_CPU=1 runs the official code at the "
                           "smoke size on the CPU)")
def test_official_steps_run_beside_ours_at_the_smoke_size(tmp_path):
    out = tmp_path / "official_detr.json"
    done = subprocess.run([sys.executable, "-m", "bench.official_detr", "--smoke", "--json", str(out),
                           "--ours", "reference", "--budget", "300"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert data["failures"] == {} and data["inputs_identical"] == {"updetr": True, "detreg": True}
    by = {(b["extra_info"]["method"], b["extra_info"]["variant"]): b["extra_info"]
          for b in data["benchmarks"]}
    assert set(by) == {("updetr", "official"), ("updetr", "reference"), ("detreg", "official"),
                       ("detreg", "reference")}
    for method in ("updetr", "detreg"):          # the same model: the trainable parameters agree
        assert by[(method, "official")]["params_trainable"] == by[(method, "reference")]["params_trainable"]
        assert by[(method, "official")]["matcher"]["scipy_calls_per_step"] > 0
        assert by[(method, "official")]["official"]["commit"]
    assert "bar: UP-DETR ours reference" in data["bar"] and "vs official" in render([out])
