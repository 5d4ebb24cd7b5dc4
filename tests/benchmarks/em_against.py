"""em_capsnet's CPU speed against the same model at an earlier commit, in one process.

    python tests/benchmarks/em_against.py --commit 516728b [--repeats 6]

Loads ``capsbench/models/em_capsnet.py`` as it was at ``--commit`` (``git show``, into a temporary
module beside the current one; nothing is registered) and times both on the same random
MNIST-shaped batches, taking turns call by call so that both see the same machine state:

* a training step at batch 32 (forward, spread loss, backward, Adam), the quick profile's;
* a scored cell: 1,000 images through ``capsbench.train.device.predict`` at its default batch
  (500), which the current model caps at its ``inference_batch``; the earlier one at the
  ``inference_batch`` it had, if any.

Prints the median of ``--repeats`` turns for each and the speed-up. The two models compute the
same function (tests/test_em_capsnet.py checks the current one against a literal Procedure 1).
``capsbench.malloc.keep_freed_memory`` is applied to the process, as ``capsbench run`` does.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from at_commit import module_at  # tests/benchmarks/at_commit.py, beside this script

from capsbench.malloc import keep_freed_memory
from capsbench.models.em_capsnet import EMCapsNet
from capsbench.train.device import predict


def earlier_model(commit: str) -> type:
    module = module_at(commit, "capsbench/models/em_capsnet.py",  # leave the registry alone:
                       lambda src: src.replace("@register_model(", "@(lambda *a, **k: (lambda f: f))("))
    return module.EMCapsNet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commit", required=True, help="the earlier commit to time against")
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    keep_freed_memory()
    models = {args.commit: earlier_model(args.commit), "current": EMCapsNet}
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    cell = torch.rand(1000, 1, 28, 28)
    calls = {}
    for name, cls in models.items():
        torch.manual_seed(0)
        m = cls()
        opt = torch.optim.Adam(m.parameters(), 1e-3)

        def step(m=m, opt=opt):
            m.train()
            loss = m.loss(m(x), x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        calls[name] = {"training step, batch 32": step, "1,000-image cell": lambda m=m: predict(m, cell)}
    for what in calls["current"]:
        for name in calls:
            calls[name][what]()  # warm-up
        times = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name in calls:
                t = time.perf_counter()
                calls[name][what]()
                times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(v) for name, v in times.items()}
        print(f"{what}: {args.commit} {med[args.commit]:.3f} s, current {med['current']:.3f} s, "
              f"{med[args.commit] / med['current']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
