"""Choose the quick profile's learning rates on validation accuracy (never on test digits).

For each model, trains the quick budget (its steps, batch 32, Adam decayed linearly to 0) at
each candidate rate on the training set minus the validation split, and scores the clean
validation digits (the protocol's clean view: upright 28x28, or centred on the 40x40 canvas).
Prints a Markdown table; the rate with the higher validation accuracy is the profile's.
A job at the profile's own rate is trained with ``lr=None``, so its key equals the suite run's
seed-0 job and a later ``capsbench run --out`` into the same folder reuses it.

    python tests/benchmarks/tune_quick.py --out /work/runs --data-root ../shared/data \\
        --models capsnet,cnn_maxpool,lenet5,efficientnet_b0 --lrs 1e-3,5e-4 [--seeds 0,1,2] [--steps 650,700]

``CAPSBENCH_CONV=direct|fft`` in its environment compares the two convolution paths (each into its
own ``--out``: the job key does not name the path).
"""

from __future__ import annotations

import argparse

from capsbench.data.fetch import ensure_dataset
from capsbench.data.splits import validation_split
from capsbench.train.config import TrainConfig
from capsbench.train.device import accuracy, predict, to_float
from capsbench.train.profiles import get_profile
from capsbench.train.protocols import PROTOCOLS
from capsbench.train.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="capsnet,cnn_maxpool,lenet5,efficientnet_b0")
    ap.add_argument("--lrs", default="1e-3,5e-4")
    ap.add_argument("--protocol", default="mnist28_shift2")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    ap.add_argument("--steps", default=None,
                    help="comma-separated step budgets to try instead of the profile's (e.g. 650,700)")
    ap.add_argument("--out", default="runs")
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()
    profile = get_profile(args.profile)
    proto = PROTOCOLS.get(args.protocol)
    train_set = ensure_dataset("mnist", root=args.data_root, split="train")
    _, val_idx = validation_split(train_set.labels)
    x_val = proto.clean(to_float(train_set.images[val_idx]))
    y_val = train_set.labels[val_idx]
    print("| model | seed | steps | lr | validation accuracy (%) | train s |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    for model in args.models.split(","):
        for lr in (float(v) for v in args.lrs.split(",")):
            own = lr == profile.lr_for(model)
            budgets = [None] if args.steps is None else [int(v) for v in args.steps.split(",")]
            for steps, seed in ((n, int(v)) for n in budgets for v in args.seeds.split(",")):
                cfg = TrainConfig(model=model, protocol=args.protocol, profile=args.profile, seed=seed,
                                  lr=None if own else lr, steps=steps)
                res = train(cfg, out=args.out, data_root=args.data_root, device="cpu", progress=False,
                            log=lambda m: None)
                acc = accuracy(predict(res.model, x_val)[0], y_val)
                print(f"| {model} | {seed} | {res.steps_done} | {lr:g}{' (profile)' if own else ''} | {100 * acc:.2f} | "
                      f"{res.train_time_s:.0f}{' (reused)' if res.reused else ''} |", flush=True)


if __name__ == "__main__":
    main()
