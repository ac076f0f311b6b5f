"""The pretext table (README) from the pretext_<method>_<init>.json files beside this script."""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
print("| method | init | steps | held-out pretext loss | AP50 % | AP75 % | AR@10 % | AR@100 % | "
      "mean best IoU |")
print("|---|---|---|---|---|---|---|---|---|")
for method in ("updetr", "detreg", "pairdetr"):
    for init in ("random", "trained"):
        path = HERE / f"pretext_{method}_{init}.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        r = report["results"]
        steps = report["step"] if init == "trained" else 0
        loss = r.get("heldout_loss", {}).get("loss")
        loss = "–" if loss is None else f"{loss:.3f}"
        print(f"| {method} | {init} | {steps} | {loss} | {100 * r['AP50']:.2f} | "
              f"{100 * r['AP75']:.2f} | {100 * r['AR@10']:.1f} | {100 * r['AR@100']:.1f} | "
              f"{r['mean_best_iou']:.3f} |")
