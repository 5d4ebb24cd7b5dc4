"""The ``capsbench profile`` subcommand: FLOPs, speed, memory and stage times per model."""

from __future__ import annotations

import argparse
import sys


def _int_list(text: str) -> list[int]:
    """Parse a comma-separated list of whole numbers >= 1, e.g. ``1,32,128``."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"every entry must be >= 1, got {v}")
        out.append(v)
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}")
    return out


def cmd_profile(args: argparse.Namespace) -> int:
    from capsbench.cli.args import name_list
    from capsbench.models.registry import resolve_model
    from capsbench.perf.profiler import format_table, profile_dir, profile_models, write_profile
    from capsbench.store import archive_previous, ensure_writable_dir
    from capsbench.train.device import resolve_device

    models = name_list(args.models, "--models")
    models = [resolve_model(m) for m in models] if models else models
    dev = resolve_device(args.device)
    out = ensure_writable_dir(args.out)  # fail before any work, not after minutes of it
    command = "capsbench " + " ".join(sys.argv[1:])
    trace_dir = profile_dir(out, dev) / "traces" if args.trace else None
    moved = archive_previous(profile_dir(out, dev))  # this run's checkpoints must not overwrite them
    if moved is not None:
        print(f"earlier profile results moved to {moved}", file=sys.stderr)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def checkpoint(rows) -> None:  # partial results survive an interrupted run
        write_profile(rows, out, {"command": command, "status": "running"})

    rows = profile_models(
        models,
        args.batch_sizes,
        args.routing_iters,
        dev,
        args.repeats,
        warmup=args.warmup,
        budget_s=args.budget,
        stage_batch_size=args.stage_batch_size,
        routing_batch_size=args.routing_batch_size,
        threads=args.threads,
        trace_dir=trace_dir,
        log=log,
        on_progress=checkpoint,
        routing=args.routing,
        conv_impl=args.conv_impl,
    )
    run_dir = write_profile(rows, out, {"command": command, "status": "complete"})
    print(format_table(rows))
    errors = sum(1 for r in rows if r.get("error"))
    if errors:
        print(f"{errors} row(s) record an error (see the 'error' column)")
    print(f"results: {run_dir / 'results.csv'}")
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    from capsbench.cli.args import name_list
    from capsbench.errors import ConfigError
    from capsbench.models import model_info
    from capsbench.perf.speed import CUDA_ONLY, format_rows, parse_variant, run_speed, write_rows
    from capsbench.store import archive_previous, ensure_writable_dir, environment_info
    from capsbench.train.device import resolve_device

    model_info(args.model)  # an unknown name stops here, listing the known ones
    variants = name_list(args.variants, "--variants")
    for v in variants:
        parse_variant(v)
    dev = resolve_device(args.device)
    cuda_only = [v for v in variants if v in CUDA_ONLY]
    if cuda_only and dev.type != "cuda":
        raise ConfigError(f"speed variant(s) {', '.join(cuda_only)} need a CUDA device (got --device {dev.type}); "
                          "leave them out of --variants on this machine")
    out = ensure_writable_dir(args.out) / f"speed-{dev.type}"
    moved = archive_previous(out)
    if moved is not None:
        print(f"earlier speed results moved to {moved}", file=sys.stderr)
    batch_sizes = args.batch_sizes or ([128, 512, 1024] if dev.type == "cuda" else [32])

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows = run_speed(args.model, variants, batch_sizes, dev, data_root=args.data_root, budget_s=args.budget,
                     infer_batch=args.infer_batch, epoch=args.epoch, deadline_s=args.deadline, log=log,
                     routing=args.routing, conv_impl=args.conv_impl)
    write_rows(rows, out, {"command": "capsbench " + " ".join(sys.argv[1:]),
                           "environment": environment_info(dev)})
    print(format_rows(rows))
    print(f"results: {out / 'results.csv'}")
    return 0


def _add_impl_flags(p: argparse.ArgumentParser) -> None:
    """--routing and --conv, as ``capsbench speed`` and ``capsbench profile`` take them."""
    p.add_argument("--routing", choices=("auto", "torch", "triton", "cpp"), default="auto",
                   help="CapsNet routing: auto (= cpp on CPUs where it builds, torch otherwise, unless $CAPSBENCH_ROUTING "
                        "says otherwise), torch (u_hat + batched matmuls), triton (fused kernels, CUDA only) or cpp "
                        "(fused C++ kernels, CPU only)")
    p.add_argument("--conv", dest="conv_impl", choices=("auto", "direct", "fft"), default="auto",
                   help="CapsNet's convolutions: auto (= fft for float32 CPU training steps on 28x28 inputs at batch >= 32 "
                        "and inference at batch >= 100, direct otherwise, unless $CAPSBENCH_CONV says otherwise), direct "
                        "(F.conv2d: the same oneDNN / cuDNN convolutions as the CNNs) or fft (Conv1 by GEMM, PrimaryCaps by "
                        "FFT; models/kernels/fft_conv.py); cnn_maxpool / cnn_strided: their second convolution, by the same rule")


def add_commands(sub, add_common) -> None:
    from capsbench.cli.args import nonneg_int, positive_float, positive_int

    p = sub.add_parser(
        "profile",
        help="FLOPs, training/inference speed, memory and per-stage time of each model",
        description=(
            "Profile models on random MNIST-sized inputs and write <out>/profile-<device>/results.csv "
            "and run.json. Defaults: models capsnet, lenet5, cnn_maxpool, efficientnet_b0; batch sizes "
            "1,32,128,512 on CUDA and 1,32,128 on CPU (at 512 a training step takes 10-15 s on a "
            "2-core CPU, about a minute per model); routing iterations 1,2,3,5 timed at batch 32 (CPU) or 128 (GPU)."
        ),
    )
    p.add_argument("--models", default=None, help="comma-separated model names (default: capsnet,lenet5,cnn_maxpool,efficientnet_b0)")
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="e.g. 1,32,128,512 (default depends on the device)")
    p.add_argument("--routing-iters", type=_int_list, default=None, help="routing iterations for capsule models (default 1,2,3,5)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed repeats per configuration (default 5)")
    p.add_argument("--warmup", type=nonneg_int, default=2, help="untimed warm-up calls (default 2)")
    p.add_argument("--budget", type=positive_float, default=None,
                   help="seconds of timed repeats per configuration before stopping early, after 3 repeats "
                        "(default 4 on CPU, 2 on GPU)")
    p.add_argument("--stage-batch-size", type=positive_int, default=None,
                   help="batch size of the per-stage breakdown (default 32 on CPU, 128 on GPU)")
    p.add_argument("--routing-batch-size", type=positive_int, default=None,
                   help="batch size of the routing-iteration sweep (default 32 on CPU, 128 on GPU)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--trace", action="store_true",
                   help="also write a torch.profiler chrome trace of one training step per model, with stage ranges")
    _add_impl_flags(p)
    add_common(p)
    p.set_defaults(func=cmd_profile)

    s = sub.add_parser(
        "speed",
        help="images/s of a model's real training step with the data on the device (bf16, channels_last, "
             "CUDA graphs, torch.compile)",
        description="Time the runner's training step and inference of one model, MNIST resident on the "
                    "device, per speed variant and batch size; writes <out>/speed-<device>/results.csv. "
                    "See capsbench/perf/speed.py for what each variant does.",
    )
    s.add_argument("--model", default="capsnet", help="model to time (a name, or pkg.module:factory)")
    s.add_argument("--variants", default="fp32,bf16,bf16_cl,bf16_cl_graph",
                   help="comma-separated: fp32, fp32_cl, bf16, bf16_cl, bf16_cl_graph, bf16_cl_compile "
                        "(bf16 and later need CUDA, except bf16 autocast also runs on CPU)")
    s.add_argument("--batch-sizes", type=_int_list, default=None, help="default 128,512,1024 on CUDA, 32 on CPU")
    s.add_argument("--budget", type=positive_float, default=2.0, help="seconds of timed repeats per configuration")
    s.add_argument("--infer-batch", type=positive_int, default=1024, help="inference batch size (default 1024)")
    s.add_argument("--epoch", action="store_true", help="also time one full pass over the 60,000 training images")
    s.add_argument("--deadline", type=positive_float, default=None,
                   help="skip the configurations that would start after this many seconds")
    _add_impl_flags(s)
    add_common(s)
    s.set_defaults(func=cmd_speed)
