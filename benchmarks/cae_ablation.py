"""The CAE-DFKD ablation table and plot from finished runs' workdirs (README "CAE-DFKD").

    python -m benchmarks.cae_ablation --out benchmarks/results/cae_ablation \\
        --row "NAYER=workdirs/nayer_s0,workdirs/nayer_s1" --row "NAYER + CEND=workdirs/cend_s0" ...

For each row (one or more seeds): final and best student top-1, relative accuracy (100 · student / teacher on the
same images), the generator steps until a synthesis round's best loss first reaches NAYER's final one (the first
row is the reference: the mean over its seeds of the last round's best loss), and synthesis image-steps/s; then,
from the final students and the teacher on the run's test images, each class's top-1 and the student's agreement
with the teacher. Writes OUT.md (the tables), OUT.json and OUT.png (student top-1 against wall-clock, synthesis +
distillation seconds, and each round's best generator loss).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def read_run(workdir: str) -> dict:
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    rounds = []  # (cumulative generator steps at the end of the round, that round's best loss)
    steps = 0
    for epoch in metrics:
        keys = sorted((k for k in epoch if k.startswith("synthesis/round_best_loss/")),
                      key=lambda k: int(k.split("/")[-1]))
        for key in keys:
            steps += config["synthesis"]["g_steps"]
            rounds.append((steps, epoch[key]))
    curve = [(m["budget/seconds"], m["eval/student_top1"]) for m in metrics if "eval/student_top1" in m]
    return {"workdir": workdir, "config": config, "metrics": metrics, "summary": summary, "rounds": rounds,
            "curve": curve}


def per_class(workdir: str, config: dict) -> dict:
    """Top-1 per class of the run's final student, and its agreement with the teacher, on the run's test images."""
    import ml_collections

    from dfkd_jax.evaluate import evaluate
    from dfkd_jax.network_io import load_network
    from dfkd_jax.teachers import evaluation_source

    source = evaluation_source(ml_collections.ConfigDict(config))
    labels = source.read(np.arange(len(source)))[1]
    predictions = {}
    for name in ("student", "teacher"):
        network, variables, _ = load_network(os.path.join(workdir, name))
        logits = evaluate(network, variables, source, progress=False, return_logits=True)["logits"]
        predictions[name] = np.argmax(np.asarray(logits), axis=-1)
    classes = int(labels.max()) + 1
    return {"per_class_top1": [float(100 * np.mean(predictions["student"][labels == c] == c)) for c in range(classes)],
            "teacher_per_class_top1": [float(100 * np.mean(predictions["teacher"][labels == c] == c))
                                       for c in range(classes)],
            "agreement_with_teacher": float(100 * np.mean(predictions["student"] == predictions["teacher"]))}


def steps_to_reach(rounds: list[tuple[int, float]], target: float) -> int | None:
    return next((steps for steps, loss in rounds if loss <= target), None)


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "not reached"
    if len(values) == 1:
        return f"{values[0]:.2f}" if isinstance(values[0], float) else f"{values[0]}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", action="append", required=True, help="NAME=WORKDIR[,WORKDIR...] (first: reference)")
    parser.add_argument("--out", required=True, help="output path without extension")
    args = parser.parse_args(argv)

    rows = []
    for spec in args.row:
        name, workdirs = spec.split("=", 1)
        rows.append((name, [read_run(w) for w in workdirs.split(",")]))
    reference_loss = float(np.mean([run["rounds"][-1][1] for run in rows[0][1]]))

    table = ["| run | seeds | final top-1 | best top-1 | relative accuracy | generator steps to NAYER's final "
             f"round loss ({reference_loss:.1f}) | synthesis image-steps/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    record = {"reference_round_loss": reference_loss, "rows": []}
    for name, runs in rows:
        final = [r["summary"]["student_top1"] for r in runs]
        best = [r["summary"]["best_student_top1"] for r in runs]
        relative = [r["summary"]["relative_accuracy"] for r in runs]
        reached = [steps_to_reach(r["rounds"], reference_loss) for r in runs]
        speed = [r["summary"]["synthesis_image_steps_per_s"] for r in runs]
        total_steps = runs[0]["rounds"][-1][0]
        reached_text = ", ".join("not reached" if s is None else str(s) for s in reached) + f" of {total_steps}"
        seeds = ", ".join(str(r["config"]["seed"]) for r in runs)
        table.append(f"| {name} | {seeds} | {mean_sd(final)} | {mean_sd(best)} | {mean_sd(relative)} | "
                     f"{reached_text} | {mean_sd(speed)} |")
        record["rows"].append({"name": name, "workdirs": [r["workdir"] for r in runs], "final_top1": final,
                               "best_top1": best, "relative_accuracy": relative, "steps_to_reference": reached,
                               "synthesis_image_steps_per_s": speed,
                               "round_best_losses": [r["rounds"] for r in runs]})
    # Where the differences go: per class, and agreement with the teacher on real images.
    analyses = {name: [per_class(run["workdir"], run["config"]) for run in runs] for name, runs in rows}
    classes = len(next(iter(analyses.values()))[0]["per_class_top1"])
    teacher_row = next(iter(analyses.values()))[0]["teacher_per_class_top1"]
    header = " | ".join(f"class {c}" for c in range(classes))
    table += ["", f"| run | agreement with the teacher on test images | {header} |",
              "| --- | --- |" + " --- |" * classes,
              "| teacher | | " + " | ".join(f"{v:.0f}" for v in teacher_row) + " |"]
    for (name, runs), record_row in zip(rows, record["rows"]):
        results = analyses[name]
        agreement = mean_sd([r["agreement_with_teacher"] for r in results])
        classwise = np.mean([r["per_class_top1"] for r in results], axis=0)
        table.append(f"| {name} | {agreement} | " + " | ".join(f"{v:.0f}" for v in classwise) + " |")
        record_row["analysis"] = results

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(table) + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump(record, f, indent=1)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (name, runs), colour in zip(rows, colours):
        for index, run in enumerate(runs):
            seconds, top1 = zip(*run["curve"])
            accuracy_axis.plot(np.asarray(seconds) / 60, top1, color=colour, marker="o", markersize=3,
                               label=name if index == 0 else None, alpha=1.0 if index == 0 else 0.6)
            steps, round_losses = zip(*run["rounds"])
            loss_axis.plot(steps, round_losses, color=colour, label=name if index == 0 else None,
                           alpha=1.0 if index == 0 else 0.6)
    accuracy_axis.set(xlabel="wall-clock minutes (synthesis + distillation)", ylabel="student top-1 (%)",
                      title="Student top-1 on the test images")
    loss_axis.axhline(reference_loss, color="grey", linestyle=":", label="NAYER's final round loss")
    loss_axis.set(xlabel="generator steps", ylabel="best loss of the round", yscale="log",
                  title="Synthesis: each round's best generator loss")
    for axis in (accuracy_axis, loss_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(args.out + ".png", dpi=110)
    print("\n".join(table))


if __name__ == "__main__":
    main()
