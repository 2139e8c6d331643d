"""Synthesis and distillation throughput, JAX against the PyTorch reference, side by side in one invocation.

    python -m benchmarks.synthesis --method nayer --teacher ../shared/teachers/akamaster/resnet56-4bfd9763.th \
        --arch resnet56 --student resnet20 --batch 256 --impl jax,torch [--dtype float32|bfloat16] \
        [--sweep 64,128,256,512] [--repeats 5] [--out benchmarks/results]

What one step is, on both sides (the trainer's own step on the JAX side, `benchmarks/torch_steps.py` on the other):
- `nayer`: one NAYER generator step (generator forward, crop + flip, teacher and student forward, 10·BN + 0.5·CE +
  1.33·adv, backward through teacher and generator, Adam); unit: image-steps/s;
- `deepinv`: one DeepInversion pixel step (jitter + flip, teacher and student forward, BN + CE + adv + TV, backward
  to the pixels, Adam, clip); unit: image-steps/s;
- `kd`: one student step (crop + flip, teacher forward, student forward and backward on KL(τ), SGD); unit: images/s.
Augmentation draws are made inside each step on both sides. Compilation and warm-up are excluded; each repeat times
`--steps` consecutive steps after a device sync; the table shows median and min–max over `--repeats` repeats.

Also reported, per implementation: FLOPs per image-step (XLA's cost analysis of the compiled JAX step; PyTorch's
`FlopCounterMode` on the torch step), achieved FLOP/s and its fraction of the machine's matrix-product peak
(float32 GEMM measured in this run, best of both libraries), and peak memory (GPU: the allocator's peak; CPU: the
process's peak resident set during the timed steps, reset before each implementation).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

from dfkd_jax import xla_cpu  # before JAX starts a backend: its XLA:CPU flags are part of what is measured

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

IMPLS = ("jax", "torch")
UNITS = {"nayer": "image-steps/s", "deepinv": "image-steps/s", "kd": "images/s"}


# ---------------------------------------------------------------------------------------------- measuring

def timed_repeats(run_steps: Callable[[int], None], steps: int, repeats: int, warmup: int) -> list[float]:
    """Seconds per repeat of `steps` steps, after `warmup` untimed steps (compilation, allocator warm-up)."""
    run_steps(warmup)
    return [_time(run_steps, steps) for _ in range(repeats)]


def _time(run_steps, steps):
    started = time.perf_counter()
    run_steps(steps)
    return time.perf_counter() - started


def gemm_peak(impl: str, n: int = 2048, repeats: int = 5) -> float:
    """float32 FLOP/s of an n×n matrix product, the best of `repeats`."""
    if impl == "jax":
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        matmul = jax.jit(lambda x: x @ x)
        matmul(a).block_until_ready()
        best = min(_time(lambda _: matmul(a).block_until_ready(), 1) for _ in range(repeats))
    else:
        import torch
        device = torch_device()
        a = torch.randn(n, n, device=device)
        torch.mm(a, a)
        _sync_torch()

        def one(_):
            torch.mm(a, a)
            _sync_torch()

        best = min(_time(one, 1) for _ in range(repeats))
    return 2 * n ** 3 / best


def torch_device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync_torch():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak_memory(impl: str) -> None:
    if impl == "torch" and torch_device().type == "cuda":
        import torch
        torch.cuda.reset_peak_memory_stats()
    elif jax.devices()[0].platform == "cpu" or impl == "torch":
        with contextlib.suppress(OSError):  # Linux: "5" resets the VmHWM high-water mark
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")


def peak_memory_bytes(impl: str) -> tuple[int | None, str]:
    if impl == "torch" and torch_device().type == "cuda":
        import torch
        return torch.cuda.max_memory_allocated(), "CUDA allocator peak"
    if impl == "jax" and jax.devices()[0].platform != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use"), "device allocator peak"
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "process peak RSS"
    return None, "unavailable"


def xla_flops(jitted, *args) -> float | None:
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else {}
    return (analysis or {}).get("flops")


def describe_device(impl: str) -> str:
    if impl == "jax":
        device = jax.devices()[0]
        return f"{device.platform}: {device.device_kind} ×{jax.device_count()}"
    import torch
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


# ------------------------------------------------------------------------------------------------ the cases

class Case:
    """One implementation of one method at one batch size: `run(n)` takes n steps and waits for them."""

    def __init__(self, run: Callable[[int], None], flops_per_step: float | None, batch: int):
        self.run = run
        self.flops_per_step = flops_per_step
        self.batch = batch


def build_cases(args, batch: int, impls: list[str]) -> dict[str, Callable[[], Case]]:
    """Factories, so each implementation is built (and its memory allocated) right before it is measured."""
    from benchmarks import pairs
    teacher_raw, spec, teacher_net, teacher_variables = pairs.load_teacher(args.teacher, args.arch,
                                                                           args.normalisation)
    student_raw, student_net, student_variables = pairs.fresh_student(args.student, spec, seed=0)
    factories = {}
    if "jax" in impls:
        factories["jax"] = lambda: _jax_case(args, batch, teacher_net, teacher_variables, student_net,
                                             student_variables)
    if "torch" in impls:
        factories["torch"] = lambda: _torch_case(args, batch, teacher_raw, spec, student_raw, student_net)
    return factories


def _jax_case(args, batch, teacher_net, teacher_variables, student_net, student_variables) -> Case:
    from benchmarks import pairs
    from dfkd_jax import augment, distill, losses, parallel
    from dfkd_jax.methods.base import class_balanced_targets

    mesh = parallel.make_data_mesh()
    replicated = parallel.replicated(mesh)
    teacher_variables = jax.device_put(teacher_variables, replicated)
    student_variables = jax.device_put(student_variables, replicated)
    key = jax.random.key(0)

    if args.method == "nayer":
        config = pairs.method_config("nayer", synthesis=dict(batch_size=batch))
        method = pairs.build_method(config, teacher_net, student_net, mesh)
        variables = jax.device_put(method.generator.init(key), replicated)
        opt = method.optimizer.init(variables["params"])
        targets = class_balanced_targets(key, batch, method.num_classes)
        bn_ema = losses.init_bn_ema(teacher_net.bn_channels(method.image_shape))

        def step(carry, key, teacher_variables, student_variables):
            variables, opt, bn_ema = carry
            crop = augment.crop_flip_params(key, batch)
            variables, opt, loss, _, _, moments, _ = method.generator_update(
                variables, opt, targets, crop, bn_ema, teacher_variables, student_variables, adversarial=True)
            return (variables, opt, bn_ema), loss

        carry = (variables, opt, bn_ema)
    elif args.method == "deepinv":
        config = pairs.method_config("deepinv", synthesis=dict(batch_size=batch))
        method = pairs.build_method(config, teacher_net, student_net, mesh)
        pixels = {"pixels": jax.device_put(jax.random.normal(key, (batch, *method.image_shape)),
                                           parallel.batch_sharded(mesh))}
        targets = jnp.sort(jax.random.randint(key, (batch,), 0, method.num_classes))

        def step(carry, key, teacher_variables, student_variables):
            pixels, opt = carry
            pixels, opt, loss, _, _ = method.pixel_update(pixels, opt, targets, augment.jitter_flip_params(key),
                                                          teacher_variables, student_variables)
            return (pixels, opt), loss

        carry = (pixels, method.optimizer.init(pixels))
    else:
        config = pairs.method_config("nayer", student=dict(schedule="constant", lr=0.1))
        method = pairs.build_method(config, teacher_net, student_net, mesh)
        optimizer, _ = distill.make_optimizer(config.student, 1, 1)
        kd_update = distill.make_kd_update(method, optimizer)
        images = jax.device_put(jax.random.uniform(key, (batch, 32, 32, 3)), parallel.batch_sharded(mesh))

        def step(carry, key, teacher_variables, student_variables):
            augmented = augment.crop_flip(images, augment.crop_flip_params(key, batch))
            carry, loss, _ = kd_update(carry, augmented, teacher_variables)
            return carry, loss

        carry = {"student": student_variables, "student_opt": optimizer.init(student_variables["params"]),
                 **distill.init_extras_state(method, optimizer, key), "synth": {}}

    # bfloat16: matrix products and convolutions take bfloat16 inputs with float32 accumulation (the JAX analogue of
    # the PyTorch side's autocast); parameters, optimizer states and losses stay float32. float32: full float32 on
    # both sides (no TF32 on GPUs: the PyTorch side turns cuDNN's off too).
    precision = jax.default_matmul_precision("bfloat16" if args.dtype == "bfloat16" else "highest")
    jitted = jax.jit(step, donate_argnums=0)
    with precision:
        flops = xla_flops(jitted, carry, key, teacher_variables, student_variables)
    state = {"carry": carry, "key": key}

    def run(n):
        loss = None
        with precision:
            for _ in range(n):
                state["key"], step_key = jax.random.split(state["key"])
                state["carry"], loss = jitted(state["carry"], step_key, teacher_variables, student_variables)
        if loss is not None:
            loss.block_until_ready()

    return Case(run, flops, batch)


def _torch_case(args, batch, teacher_raw, spec, student_raw, student_net) -> Case:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks import pairs, torch_steps

    device = torch_device()
    teacher_raw, student_raw = teacher_raw.to(device), student_raw.to(device)
    teacher = pairs.with_normalisation(teacher_raw, spec).to(device)
    student = pairs.with_normalisation(student_raw, spec).to(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())

    def crop_draw():
        return torch_steps.CropFlipDraw(torch.randint(0, 9, (batch, 2), device=device),
                                        torch.rand(batch, device=device) < 0.5)

    if args.method == "nayer":
        from dfkd_jax.methods.base import label_embedding
        config = pairs.method_config("nayer", synthesis=dict(batch_size=batch))
        embeddings = label_embedding(spec.num_classes, config.synthesis.embedding_dim, "", config.seed)
        generator = pairs.torch_nayer_generator(config, embeddings, spec.num_classes, (32, 32, 3)).to(device)
        generator.le = generator.le.to(device)
        synthesis = config.synthesis
        step = torch_steps.NayerGeneratorStep(
            generator, teacher, student, lr=synthesis.lr, betas=tuple(synthesis.betas), bn_weight=synthesis.bn_weight,
            ce_weight=synthesis.ce_weight, adv_weight=synthesis.adv_weight, bn_momentum=synthesis.bn_momentum)
        targets = torch.arange(batch, device=device) % spec.num_classes

        def one():
            with autocast:
                step(targets, crop_draw())
    elif args.method == "deepinv":
        pixels = torch.randn(batch, 3, 32, 32, device=device)
        synthesis = pairs.method_config("deepinv").synthesis
        step = torch_steps.PixelStep(
            pixels, teacher_raw, student_raw, spec.mean, spec.std, lr=synthesis.lr, betas=tuple(synthesis.betas),
            bn_weight=synthesis.bn_weight, ce_weight=synthesis.ce_weight, adv_weight=synthesis.adv_weight,
            tv_weight=synthesis.tv_weight, l2_weight=synthesis.l2_weight, adv_temperature=synthesis.adv_temperature)
        step.low, step.high = step.low.to(device), step.high.to(device)
        targets = torch.sort(torch.randint(0, spec.num_classes, (batch,), device=device)).values

        def one():
            draw = torch_steps.JitterDraw(tuple(int(v) for v in torch.randint(-4, 5, (2,))),
                                          bool(torch.rand(()) < 0.5))
            with autocast:
                step(targets, draw)
    else:
        student_config = pairs.method_config("nayer").student
        step = torch_steps.KDStep(teacher, student, lr=0.1, momentum=student_config.momentum,
                                  weight_decay=student_config.weight_decay, temperature=student_config.temperature)
        images = torch.rand(batch, 3, 32, 32, device=device)

        def one():
            with autocast:
                step(images, crop_draw())

    counter = FlopCounterMode(display=False)
    with counter:
        one()
    flops = float(counter.get_total_flops())

    def run(n):
        for _ in range(n):
            one()
        _sync_torch()

    return Case(run, flops, batch)


# ------------------------------------------------------------------------------------------------- running

def measure(args, batch: int, impls: list[str]) -> dict:
    factories = build_cases(args, batch, impls)
    results = {}
    for impl in impls:
        reset_peak_memory(impl)
        case = factories[impl]()
        seconds = timed_repeats(case.run, args.steps, args.repeats, args.warmup)
        rates = [args.steps * batch / s for s in seconds]
        memory, memory_kind = peak_memory_bytes(impl)
        flops_per_image = case.flops_per_step / batch if case.flops_per_step else None
        median = statistics.median(rates)
        results[impl] = {
            "throughput_median": median, "throughput_min": min(rates), "throughput_max": max(rates),
            "unit": UNITS[args.method], "repeats": len(rates), "steps_per_repeat": args.steps,
            "flops_per_image_step": flops_per_image,
            "flops_source": "XLA cost analysis" if impl == "jax" else "torch FlopCounterMode",
            "achieved_flops": flops_per_image * median if flops_per_image else None,
            "peak_memory_bytes": memory, "peak_memory_kind": memory_kind, "device": describe_device(impl),
        }
        del case
        print(f"  {impl}: {median:,.1f} {UNITS[args.method]} (batch {batch})", file=sys.stderr)
    return results


def finish(results: dict, peak: float) -> dict:
    for row in results.values():
        if row["achieved_flops"]:
            row["fraction_of_gemm_peak"] = row["achieved_flops"] / peak
    if "jax" in results and "torch" in results:
        results["ratio_jax_over_torch"] = results["jax"]["throughput_median"] / results["torch"]["throughput_median"]
    return results


def table(args, by_batch: dict, peaks: dict) -> str:
    lines = [f"{args.method}: {args.arch} teacher, {args.student} student, {args.dtype}; "
             f"GEMM peak {max(peaks.values()) / 1e9:.1f} GFLOP/s ("
             + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peaks.items()) + ")",
             "| batch | impl | throughput (median, min–max) | GFLOP/image-step | achieved GFLOP/s | % of peak "
             "| peak memory | device |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for batch, results in by_batch.items():
        for impl in IMPLS:
            if impl not in results:
                continue
            r = results[impl]
            flops = f"{r['flops_per_image_step'] / 1e9:.3f}" if r["flops_per_image_step"] else "–"
            achieved = f"{r['achieved_flops'] / 1e9:.1f}" if r["achieved_flops"] else "–"
            fraction = f"{100 * r['fraction_of_gemm_peak']:.0f}%" if r.get("fraction_of_gemm_peak") else "–"
            memory = f"{r['peak_memory_bytes'] / 2 ** 20:,.0f} MiB" if r["peak_memory_bytes"] else "–"
            lines.append(f"| {batch} | {impl} | {r['throughput_median']:,.1f} ({r['throughput_min']:,.1f}–"
                         f"{r['throughput_max']:,.1f}) {r['unit']} | {flops} | {achieved} | {fraction} | {memory} "
                         f"| {r['device']} |")
        if "ratio_jax_over_torch" in results:
            lines.append(f"| {batch} | **JAX / PyTorch** | **{results['ratio_jax_over_torch']:.2f}×** | | | | | |")
    return "\n".join(lines)


def plot(path: str, args, by_batch: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6, 4))
    batches = list(by_batch)
    for impl in IMPLS:
        if all(impl in r for r in by_batch.values()):
            axis.plot(batches, [by_batch[b][impl]["throughput_median"] for b in batches], marker="o", label=impl)
    axis.set_xscale("log", base=2)
    axis.set_xticks(batches, [str(b) for b in batches])
    axis.set_xlabel("batch size")
    axis.set_ylabel(UNITS[args.method])
    axis.set_title(f"{args.method}: {args.arch} → {args.student}, {args.dtype}")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(UNITS), required=True)
    parser.add_argument("--teacher", required=True, help="the original PyTorch teacher checkpoint")
    parser.add_argument("--arch", required=True, help="the teacher's architecture, e.g. resnet56")
    parser.add_argument("--normalisation", default="imagenet", help="teacher input normalisation (akamaster: "
                        "imagenet; chenyaofo: cifar10)")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--impl", default="jax,torch")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--sweep", default="", help="comma-separated batch sizes; also writes a PNG plot")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocators)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    impls = [i for i in args.impl.split(",") if i]
    unknown = set(impls) - set(IMPLS)
    if unknown or not impls:
        parser.error(f"--impl takes a comma-separated subset of {','.join(IMPLS)}, got {args.impl!r}")
    args.impls = impls
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (the table reports a median and a min–max)")
    if not os.path.isfile(args.teacher):
        parser.error(f"--teacher {args.teacher}: no such file (the original PyTorch checkpoint, e.g. "
                     "../shared/teachers/akamaster/resnet56-4bfd9763.th)")
    try:
        args.batches = [int(b) for b in args.sweep.split(",")] if args.sweep else [args.batch]
    except ValueError:
        parser.error(f"--sweep takes comma-separated integers, got {args.sweep!r}")
    if min(args.batches) < 1:
        parser.error("batch sizes must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if "torch" in args.impls:
        import torch
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    peaks = {impl: gemm_peak(impl) for impl in args.impls}
    by_batch = {}
    for batch in args.batches:
        print(f"{args.method} batch {batch}", file=sys.stderr)
        by_batch[batch] = finish(measure(args, batch, args.impls), max(peaks.values()))
    report = {"method": args.method, "teacher": args.teacher, "arch": args.arch, "student": args.student,
              "dtype": args.dtype, "gemm_peak_flops": peaks, "host": platform.node(), "cpu_count": os.cpu_count(),
              "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "xla_cpu_convolutions": "Eigen" if xla_cpu.eigen_convolutions() else "YNNPACK", "results": {str(b): r for b, r in by_batch.items()}}
    if "torch" in args.impls:
        import torch
        report["torch"] = torch.__version__
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{args.method}_{args.arch}_{args.student}_{args.dtype}"
                                  + ("_sweep" if args.sweep else f"_b{args.batch}"))
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    print(table(args, by_batch, peaks))
    if args.sweep:
        plot(stem + ".png", args, by_batch)
        print(f"plot: {stem}.png")
    print(f"json: {stem}.json")
    return report


if __name__ == "__main__":
    main()
