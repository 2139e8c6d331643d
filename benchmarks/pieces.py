"""Where a step's time goes: the networks' passes timed alone on both sides, and XLA's most expensive operations.

    python -m benchmarks.pieces --teacher ../shared/teachers/akamaster/resnet56-4bfd9763.th --arch resnet56 \
        --student resnet20 --batch 256 [--repeats 3] [--profile-steps 3]

Prints, for JAX (jitted alone) and PyTorch (eager, as `benchmarks/torch_steps.py` runs it): the teacher's forward
pass in eval mode, its forward pass plus the gradient to the input (what a synthesis step backpropagates through),
and the student's training-mode forward pass with and without the backward pass to its parameters (what a KD step
trains), median of `--repeats` after one warm-up. Then a `jax.profiler` trace of `--profile-steps` student forward +
backward passes, summed per kind of XLA operation (the name without its number), as milliseconds per step, and
PyTorch's own profiler over the same passes (self CPU time per operator).
"""

from __future__ import annotations

from dfkd_jax import xla_cpu  # before JAX starts a backend: its XLA:CPU flags are part of what is measured

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402


def median_ms(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def jax_pieces(teacher, teacher_variables, student, student_variables, images, repeats):
    def student_logits(params, x):
        variables = {"params": params, "batch_stats": student_variables["batch_stats"]}
        return student.apply(variables, x, train=True)[0].logits

    pieces = {
        "teacher forward (eval)": jax.jit(lambda x: teacher.apply(teacher_variables, x)[0].logits),
        "teacher forward + input gradient": jax.jit(jax.grad(lambda x: teacher.apply(teacher_variables, x)[0]
                                                              .logits.sum())),
        "student forward (train-mode BN)": jax.jit(lambda x: student_logits(student_variables["params"], x)),
        "student forward + backward": jax.jit(lambda x: jax.grad(lambda p: student_logits(p, x).sum())(
            student_variables["params"])),
    }
    return {name: median_ms(lambda: jax.block_until_ready(f(images)), repeats) for name, f in pieces.items()}


def torch_pieces(teacher_raw, student_raw, spec, images, repeats):
    import torch

    from benchmarks import pairs

    teacher = pairs.with_normalisation(teacher_raw, spec).eval()
    student = pairs.with_normalisation(student_raw, spec).train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())

    def teacher_forward():
        with torch.no_grad():
            teacher(x)

    def teacher_input_gradient():
        teacher(x.clone().requires_grad_(True)).sum().backward()

    def student_forward():
        with torch.no_grad():
            student(x)

    def student_backward():
        student(x).sum().backward()

    pieces = {"teacher forward (eval)": teacher_forward, "teacher forward + input gradient": teacher_input_gradient,
              "student forward (train-mode BN)": student_forward, "student forward + backward": student_backward}
    return {name: median_ms(run, repeats) for name, run in pieces.items()}


def torch_operation_profile(student_raw, spec, images, steps: int) -> tuple[dict[str, float], float]:
    """The same for PyTorch: self CPU time per operator (torch.profiler) per student forward + backward."""
    import torch

    from benchmarks import pairs

    student = pairs.with_normalisation(student_raw, spec).train()
    x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
    student(x).sum().backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        for _ in range(steps):
            student(x).sum().backward()
        wall_ms = 1000 * (time.perf_counter() - started) / steps
    per_operator = {event.key: event.self_cpu_time_total / 1000 / steps for event in profiler.key_averages()}
    return dict(sorted(per_operator.items(), key=lambda kv: -kv[1])), wall_ms


def xla_operation_profile(student, student_variables, images, steps: int) -> tuple[dict[str, float], float]:
    """Milliseconds per student forward + backward, per kind of XLA operation, from a jax.profiler trace; and the
    wall time per traced step."""
    def loss(params):
        variables = {"params": params, "batch_stats": student_variables["batch_stats"]}
        return student.apply(variables, images, train=True)[0].logits.sum()
    step = jax.jit(jax.grad(loss))
    jax.block_until_ready(step(student_variables["params"]))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        started = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(step(student_variables["params"]))
        wall_ms = 1000 * (time.perf_counter() - started) / steps
        jax.profiler.stop_trace()
        (trace_file,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(trace_file) as f:
            events = json.load(f)["traceEvents"]
    per_kind = collections.defaultdict(float)
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and not name.startswith(("$", "ThunkExecutor")):  # Python frames, the executor
            per_kind[re.sub(r"[.\d]+$", "", name)] += event.get("dur", 0) / 1000 / steps
    return dict(sorted(per_kind.items(), key=lambda kv: -kv[1])), wall_ms


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="PyTorch teacher file")
    parser.add_argument("--arch", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="JAX only (no PyTorch installed)")
    args = parser.parse_args(argv)

    from benchmarks import pairs

    teacher_raw, spec, teacher, teacher_variables = pairs.load_teacher(args.teacher, args.arch)
    student_raw, student, student_variables = pairs.fresh_student(args.student, spec)
    images = jax.numpy.asarray(np.random.default_rng(0).random((args.batch, 32, 32, 3), np.float32))

    jax_ms = jax_pieces(teacher, teacher_variables, student, student_variables, images, args.repeats)
    torch_ms = ({} if args.no_torch else torch_pieces(teacher_raw, student_raw, spec, images, args.repeats))
    convolutions = "Eigen" if xla_cpu.eigen_convolutions() else "YNNPACK"
    print(f"batch {args.batch}, {jax.devices()[0].platform} (XLA:CPU convolutions: {convolutions}), "
          f"median of {args.repeats}")
    print("| piece | JAX | PyTorch |\n| --- | --- | --- |")
    for name, ms in jax_ms.items():
        print(f"| {name} | {ms:.0f} ms | {f'{torch_ms[name]:.0f} ms' if name in torch_ms else '–'} |")
    profiles = {"XLA operations": xla_operation_profile(student, student_variables, images, args.profile_steps)}
    if not args.no_torch:
        profiles["PyTorch operators (self time)"] = torch_operation_profile(student_raw, spec, images,
                                                                           args.profile_steps)
    for what, (profile, wall_ms) in profiles.items():
        print(f"\n{what} in the student's forward + backward, per step ({wall_ms:.0f} ms wall while traced, "
              f"{sum(profile.values()):.0f} ms in named operations):")
        for kind, ms in list(profile.items())[:12]:
            print(f"  {ms:8.1f} ms  {100 * ms / wall_ms:4.1f}% of wall  {kind}")


if __name__ == "__main__":
    main()
