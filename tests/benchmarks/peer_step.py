"""CPU training-step time of capsbench's paper CapsNet against public PyTorch CapsNets, in one process.

What it measures: one training step (forward, the paper's loss = margin + 0.0005 x sum-of-squares
reconstruction, backward, Adam step) of ``capsbench.models.create_model("capsnet")`` (Sabour et al.
2017: Conv1 256 9x9, PrimaryCaps 32 x 8-D, DigitCaps 10 x 16-D, 3 routing iterations, decoder
512-1024-784) and of each peer implementation, on the CPU, at the same batch sizes and on the
same random MNIST-shaped batches (28x28 in [0, 1], random labels). The implementations take
turns step by step (ours, peer 1, peer 2, ours, peer 1, ...), so all see the same machine state;
the table gives the median step time, images/s and our speed-up (peer median / our median).

Every implementation trains with the same optimizer, Adam lr 1e-3 built by capsbench's
``make_optimizer`` (fused on CPUs from torch 2.4): the comparison is of the models, and the peers
get the faster Adam too. Our model runs as ``capsbench train`` runs it: its CPU fast paths are
chosen automatically (Conv1 as a GEMM and PrimaryCaps by FFT at batch >= 32, the C++ routing
kernel); the table row says which ran. ``capsbench.malloc.keep_freed_memory`` is applied once, to
the whole process (all implementations). Each peer is the peer's own model class and its own loss
function, imported at run time from ``--peer-root``; nothing of theirs is copied into this
repository, and the thin adapters below only say how to call them and keep them on the CPU.

Peers (``--peers``, default all three):

``xifengguo``  https://github.com/XifengGuo/CapsNet-Pytorch @ 8a5a3572d91eb9479425168d3d565eb02e78be46
    (capsulenet.py, capsulelayers.py). Paper-faithful: one 256-channel PrimaryCaps convolution,
    u_hat by one broadcast matmul, routing vectorised over batch, inputs and classes (softmax over
    the output capsules, logits per example), decoder masked by the true label, loss
    ``caps_loss`` with lam_recon = 0.0005 * 784 on a per-pixel mean (= the paper's 0.0005 x SSE).
    Deviations that do not change the cost: u_hat is detached in the non-final routing
    iterations; PrimaryCaps groups an NCHW output with ``view(B, -1, 8)``. CPU: its routing calls
    ``Variable(torch.zeros(...)).cuda()``; the adapter gives its module a ``Variable`` whose
    ``.cuda()`` is a no-op. capsulenet.py imports torchvision at the top (only its training
    script uses it); a stand-in is put in place while it loads if torchvision is not installed.
``danielhavir`` https://github.com/danielhavir/capsule-network @ 1c37c2f10d3485672fd609748502a45d40e54bd7
    (model.py, capsules.py, loss.py). Paper-faithful and device-aware (runs on the CPU unchanged):
    one PrimaryCaps convolution, broadcast-matmul u_hat, vectorised routing with softmax over the
    output capsules, loss ``CapsuleLoss(loss_lambda=0.5, recon_loss_scale=5e-4)`` (its trainer's
    settings: margin + 0.0005 x SSE, summed over the batch). Deviations that do not change the
    cost: u_hat detached in the non-final iterations; the decoder is masked by the predicted
    class also while training.
``gram-ai``    https://github.com/gram-ai/capsule-networks @ 6eeda0882bff819b2e788be40cf87fe69f20f26a
    (capsule_network.py). The most-starred PyTorch CapsNet; u_hat for all classes in one
    broadcast matmul and vectorised routing; PrimaryCaps as 8 convolutions of 256 -> 32 channels
    (the same FLOPs as one 256 -> 256); loss ``CapsuleLoss`` (margin + 0.0005 x SSE, per image).
    Deviations: its routing softmax runs over the input capsules (dim 2), not the classes, and
    keeps the logits 16-D wide; class scores pass through a softmax before the margin loss.
    CPU: ``forward`` calls ``Variable(...).cuda()`` and the module only imports ``Variable``
    under ``__main__``; the adapter gives the module a ``Variable`` whose ``.cuda()`` is a no-op.
    Written for torch 0.3: on today's torch its ``.view`` of the masked capsules fails (the product
    of a transposed tensor stays transposed); a forward hook on its DigitCaps returns the same
    values laid out as old torch had them (one copy of the (B, 10, 16) output).

Looked at and left out: cedrickchee/capsule-net-pytorch and timomernick/pytorch-capsule (routing
logits shared by the batch and averaged over it, not per example; the weights and capsules are
copied batch-size and class times with torch.cat/torch.stack; PrimaryCaps as a Python list of
8 convolutions); adambielski/CapsNet-pytorch (routing logits are a learned parameter shared by
all examples, one agreement round more than asked, the reconstruction weighted on the per-pixel
mean: 784 times weaker than the paper's).

Fetch the peers (the adapters were written against the commits above), then run from the
repository root:

    mkdir -p /work/peers
    git clone https://github.com/XifengGuo/CapsNet-Pytorch /work/peers/XifengGuo-CapsNet-Pytorch
    git -C /work/peers/XifengGuo-CapsNet-Pytorch checkout 8a5a3572d91eb9479425168d3d565eb02e78be46
    git clone https://github.com/danielhavir/capsule-network /work/peers/danielhavir-capsule-network
    git -C /work/peers/danielhavir-capsule-network checkout 1c37c2f10d3485672fd609748502a45d40e54bd7
    git clone https://github.com/gram-ai/capsule-networks /work/peers/gram-ai-capsule-networks
    git -C /work/peers/gram-ai-capsule-networks checkout 6eeda0882bff819b2e788be40cf87fe69f20f26a

    python tests/benchmarks/peer_step.py --peer-root /work/peers
    CAPSBENCH_CPU_ISA=avx2 python tests/benchmarks/peer_step.py --peer-root /work/peers
    python tests/benchmarks/peer_step.py --peer-root /work/peers --peers xifengguo --batch-sizes 100 --steps 50

A peer folder may be a git clone (its commit is read with ``git rev-parse HEAD``) or a plain copy
of the files with the commit in a file named ``COMMIT``; the table records it.
``CAPSBENCH_CPU_ISA=avx2`` caps torch, oneDNN, MKL and our C++ kernel at AVX2 (capsbench/perf/isa.py)
for every implementation alike; the header gives the instruction set and torch's thread count
(set it with OMP_NUM_THREADS).
"""

from __future__ import annotations

from capsbench.perf.isa import apply_limit, isa_info, isa_label

apply_limit()  # before torch is imported: CAPSBENCH_CPU_ISA=avx2 caps ATen, oneDNN and MKL

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from capsbench.malloc import keep_freed_memory  # noqa: E402
from capsbench.models import create_model  # noqa: E402
from capsbench.train.device import channels_last_for  # noqa: E402
from capsbench.train.trainer import make_optimizer  # noqa: E402

NUM_CLASSES = 10
LR = 1e-3
# loss(x (B,1,28,28), y (B,) class indices, onehot (B,10)) -> scalar; runs the forward pass too
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class PeerUnavailable(Exception):
    """A peer that cannot be timed here: the message is the one line the user sees."""


class _CpuVariable:
    """Stands in for ``torch.autograd.Variable`` in a peer module: ``Variable(t).cuda()`` is ``t``."""

    def __init__(self, tensor: torch.Tensor, *args, **kwargs) -> None:
        self.tensor = tensor

    def cuda(self, *args, **kwargs) -> torch.Tensor:
        return self.tensor


def _load(name: str, path: Path) -> types.ModuleType:
    """Import the file ``path`` as module ``name`` (registered in sys.modules, so siblings find it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PeerUnavailable(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # their deprecated torch APIs (Variable, size_average)
            spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise PeerUnavailable(f"importing {path} failed: {type(e).__name__}: {e}") from None
    return module


@contextlib.contextmanager
def _torchvision_if_missing():
    """A bare ``torchvision`` while a peer module loads, where torchvision is not installed (the
    peer imports it at the top for its training script only; the model does not use it)."""
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    stub = types.ModuleType("torchvision")
    stub.transforms = types.ModuleType("torchvision.transforms")
    stub.datasets = types.ModuleType("torchvision.datasets")
    names = ("torchvision", "torchvision.transforms", "torchvision.datasets")
    sys.modules.update(zip(names, (stub, stub.transforms, stub.datasets), strict=True))
    try:
        yield
    finally:
        for n in names:
            sys.modules.pop(n, None)


# ----- adapters: build the peer's model and its loss, on the CPU, without editing its files -----

def _build_xifengguo(folder: Path) -> tuple[nn.Module, LossFn]:
    layers = _load("capsulelayers", folder / "capsulelayers.py")  # capsulenet.py imports it by this name
    layers.Variable = _CpuVariable  # DenseCapsule.forward: Variable(torch.zeros(...)).cuda()
    with _torchvision_if_missing():
        net = _load("peer_xifengguo_capsulenet", folder / "capsulenet.py")
    model = net.CapsuleNet(input_size=[1, 28, 28], classes=NUM_CLASSES, routings=3)
    lam_recon = 0.0005 * 784  # its training script's default: the paper's 0.0005 x SSE

    def loss(x: torch.Tensor, y: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        y_pred, x_recon = model(x, onehot)
        return net.caps_loss(onehot, y_pred, x, x_recon, lam_recon)

    return model, loss


def _build_danielhavir(folder: Path) -> tuple[nn.Module, LossFn]:
    _load("capsules", folder / "capsules.py")  # model.py: import capsules as caps
    net = _load("peer_danielhavir_model", folder / "model.py")
    losses = _load("peer_danielhavir_loss", folder / "loss.py")
    model = net.CapsuleNetwork(img_shape=(1, 28, 28), channels=256, primary_dim=8, num_classes=NUM_CLASSES,
                               out_dim=16, num_routing=3, device=torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.MSELoss(size_average=...) is deprecated
        criterion = losses.CapsuleLoss(loss_lambda=0.5, recon_loss_scale=5e-4)  # as in its trainer.py

    def loss(x: torch.Tensor, y: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        preds, recon = model(x)
        return criterion(preds, onehot, x, recon)

    return model, loss


def _build_gram_ai(folder: Path) -> tuple[nn.Module, LossFn]:
    limit = sys.getrecursionlimit()
    net = _load("peer_gram_ai_capsule_network", folder / "capsule_network.py")
    sys.setrecursionlimit(limit)  # the module raises it to 15000 on import
    net.Variable = _CpuVariable  # forward uses Variable(...).cuda(); only its __main__ imports Variable
    model = net.CapsuleNet()
    # forward does (x * y[:, :, None]).view(B, -1) on x = digit_capsules(.).squeeze().transpose(0, 1):
    # torch < 0.4 made that product contiguous, today's keeps x's transposed layout and .view fails.
    # Hand back DigitCaps' output (same values) laid out so that the transpose is contiguous: one
    # (B, 10, 16) copy, the one old torch made.
    model.digit_capsules.register_forward_hook(lambda mod, inp, out: out.transpose(0, 1).contiguous().transpose(0, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.MSELoss(size_average=False) is deprecated
        criterion = net.CapsuleLoss()

    def loss(x: torch.Tensor, y: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        classes, recon = model(x, onehot)
        return criterion(x, onehot, classes, recon)

    return model, loss


@dataclass(frozen=True)
class Peer:
    key: str
    repo: str  # owner/name on GitHub
    folder: str  # under --peer-root
    files: tuple[str, ...]
    commit: str  # the commit the adapter was written against
    build: Callable[[Path], tuple[nn.Module, LossFn]]


PEERS = {
    p.key: p
    for p in (
        Peer("xifengguo", "XifengGuo/CapsNet-Pytorch", "XifengGuo-CapsNet-Pytorch",
             ("capsulenet.py", "capsulelayers.py"), "8a5a3572d91eb9479425168d3d565eb02e78be46", _build_xifengguo),
        Peer("danielhavir", "danielhavir/capsule-network", "danielhavir-capsule-network",
             ("model.py", "capsules.py", "loss.py"), "1c37c2f10d3485672fd609748502a45d40e54bd7", _build_danielhavir),
        Peer("gram-ai", "gram-ai/capsule-networks", "gram-ai-capsule-networks",
             ("capsule_network.py",), "6eeda0882bff819b2e788be40cf87fe69f20f26a", _build_gram_ai),
    )
}


def fetch_command(peer: Peer, root: Path) -> str:
    where = root / peer.folder
    return f"git clone https://github.com/{peer.repo} {where} && git -C {where} checkout {peer.commit}"


def peer_commit(folder: Path) -> str:
    """The commit of a peer folder: ``git rev-parse HEAD`` of a clone, else its COMMIT file."""
    if (folder / ".git").exists():
        r = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.strip()
    if (folder / "COMMIT").is_file():
        return (folder / "COMMIT").read_text().strip() or "unknown"
    return "unknown"


@dataclass
class Impl:
    name: str
    commit: str
    model: nn.Module
    loss: LossFn
    opt: torch.optim.Optimizer
    channels_last: bool = False
    peer: bool = True


def load_peer(peer: Peer, root: Path) -> Impl:
    folder = root / peer.folder
    missing = [f for f in peer.files if not (folder / f).is_file()]
    if missing:
        raise PeerUnavailable(f"{', '.join(missing)} not in {folder}; fetch it with: {fetch_command(peer, root)}")
    commit = peer_commit(folder)
    if commit != peer.commit:
        print(f"peer_step: note: {peer.key} is at {commit[:12]}, the adapter was written for {peer.commit[:12]}",
              file=sys.stderr)
    torch.manual_seed(0)
    model, loss = peer.build(folder)
    model.train()
    return Impl(f"{peer.repo}", commit, model, loss, make_optimizer(model, LR, torch.device("cpu")))


def load_ours() -> Impl:
    torch.manual_seed(0)
    model = create_model("capsnet")
    cl = channels_last_for(model, torch.device("cpu"))  # as capsbench train decides it
    if cl:
        model = model.to(memory_format=torch.channels_last)
    model.train()

    def loss(x: torch.Tensor, y: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return model.loss(model(x, y), x, y)

    head = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent)
    commit = head.stdout.strip() if head.returncode == 0 else "unknown"
    return Impl("capsbench capsnet", commit, model, loss, make_optimizer(model, LR, torch.device("cpu")),
                channels_last=cl, peer=False)


def our_paths(impl: Impl, batch: int) -> str:
    """Which convolutions and routing our model takes in a training step at ``batch``."""
    m = impl.model
    x = torch.zeros(batch, 1, 28, 28)
    conv = "fft" if m.uses_fft_conv(x) else "direct"
    routing = m.routing_impl(torch.zeros(batch, m.num_primary, m.primary_dim))
    return f"conv {conv}, routing {routing}"


def train_step(impl: Impl, x: torch.Tensor, y: torch.Tensor, onehot: torch.Tensor) -> float:
    t0 = time.perf_counter()
    loss = impl.loss(x, y, onehot)
    impl.opt.zero_grad(set_to_none=True)
    loss.backward()
    impl.opt.step()
    return time.perf_counter() - t0


def batches(batch: int, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(batch)
    out = []
    for _ in range(n):
        x = torch.rand(batch, 1, 28, 28, generator=g)
        y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
        out.append((x, y, F.one_hot(y, NUM_CLASSES).float()))
    return out


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 2, got {text!r}")
    return values


def parse_peers(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in PEERS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {', '.join(unknown) or text!r}: "
                                         f"choose from {', '.join(PEERS)}")
    return keys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=parse_ints, default=[32, 128], help="comma-separated (default 32,128)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per implementation and batch size")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation first")
    ap.add_argument("--peers", type=parse_peers, default=list(PEERS),
                    help=f"comma-separated, from {', '.join(PEERS)} (default all)")
    ap.add_argument("--peer-root", type=Path, default=Path("/work/peers"),
                    help="folder holding the fetched peer repositories (default /work/peers)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")

    keep_freed_memory()  # process-wide: every implementation gets it
    impls = [load_ours()]
    for key in args.peers:
        try:
            impls.append(load_peer(PEERS[key], args.peer_root))
        except PeerUnavailable as e:
            print(f"peer_step: skipping {key}: {e}", file=sys.stderr)
    if len(impls) == 1:
        print("peer_step: no peer could be loaded; nothing to compare with", file=sys.stderr)
        return 1

    info = isa_info()
    print(f"# CapsNet CPU training step: capsbench vs public PyTorch implementations\n\n"
          f"- CPU: {info['cpu_model']}; ISA: {isa_label(info)} (CAPSBENCH_CPU_ISA={info['limit']}, "
          f"ATen {torch.backends.cpu.get_cpu_capability()}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n"
          f"- step: forward + margin + 0.0005 x SSE reconstruction loss + backward + Adam (lr {LR:g}, "
          f"{type(impls[0].opt).__name__}, fused where torch has it), same for all; random 28x28 inputs\n"
          f"- {args.steps} timed steps (after {args.warmup} warm-up) per implementation and batch size, "
          f"alternating in one process; ms = median step, p25-p75 in brackets\n", flush=True)

    rows: list[tuple[str, ...]] = []
    for batch in args.batch_sizes:
        data = batches(batch)
        gc.collect()
        times: dict[int, list[float]] = {i: [] for i in range(len(impls))}
        failed: set[int] = set()
        for step in range(args.warmup + args.steps):
            x, y, onehot = data[step % len(data)]
            for i, impl in enumerate(impls):
                if i in failed:
                    continue
                xi = x.contiguous(memory_format=torch.channels_last) if impl.channels_last else x
                try:
                    dt = train_step(impl, xi, y, onehot)
                except Exception as e:  # a peer that breaks on this torch: one line, then go on without it
                    if not impl.peer:
                        raise
                    print(f"peer_step: {impl.name} failed at batch {batch}: {type(e).__name__}: {e}",
                          file=sys.stderr)
                    failed.add(i)
                    continue
                if step >= args.warmup:
                    times[i].append(dt)
        ours = statistics.median(times[0])
        for i, impl in enumerate(impls):
            if i in failed or not times[i]:
                continue
            t = times[i]
            med = statistics.median(t)
            q = statistics.quantiles(t, n=4) if len(t) > 1 else [med, med, med]
            params = sum(p.numel() for p in impl.model.parameters())
            name = f"{impl.name} ({our_paths(impl, batch)})" if not impl.peer else impl.name
            speedup = "1.00x (ours)" if not impl.peer else f"{med / ours:.2f}x"
            rows.append((name, impl.commit[:12] if impl.peer else impl.commit, f"{params:,}", str(batch),
                         f"{med * 1e3:.1f} [{q[0] * 1e3:.1f}-{q[2] * 1e3:.1f}]", f"{batch / med:.0f}", speedup))

    header = ("implementation", "commit", "params", "batch", "step ms", "images/s", "our speed-up")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 3 + ["---:"] * 4) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
