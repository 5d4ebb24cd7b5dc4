"""One trainer and one evaluator for every model.

The model declares its loss and how to read confidence (``Classifier.loss`` /
``Classifier.confidence``); everything else (data, augmentation, optimiser, schedule,
checkpoints, seeds) is shared, so comparisons differ only in the model.

The whole training set lives on the device as one uint8 tensor; a batch is an index into
it, converted and augmented as one tensor op (no per-sample Python, no DataLoader).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from capsbench.data.datasets import data_checksums
from capsbench.data.fetch import ensure_dataset
from capsbench.data.splits import (
    stratified_sample,
    validation_split,
)
from capsbench.errors import TrainingError, first_line
from capsbench.locks import DirLock, remove_partial_files
from capsbench.malloc import keep_freed_memory
from capsbench.models import count_parameters
from capsbench.store import atomic_torch_save, environment_info, write_json
from capsbench.train.config import TrainConfig
from capsbench.train.device import (
    SpeedOptions,
    _generator,
    accuracy,
    channels_last_for,
    check_device_options,
    predict,
    resolve_device,
    seed_everything,
    to_float,
)
from capsbench.train.jobs import (
    TrainResult,
    _job_meta,
    build_model,
    job_split,
    load_finished,
    load_pretrained,
)
from capsbench.train.matching import MATCH_FAR_SUBSET, MATCH_SEARCH_STEPS, NEAR_EVERY, NEAR_TARGET
from capsbench.train.profiles import get_profile
from capsbench.train.protocols import PROTOCOLS


class _TrainState:
    """An in-memory copy of a job's model, optimiser and schedule, restored in place (so a
    captured CUDA graph, which reads the parameters', moments' and rate's memory, stays valid)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
        self.model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.opt = {id(p): {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in st.items()}
                    for p, st in opt.state.items()}
        self.lr = [float(g["lr"]) for g in opt.param_groups]
        self.sched = {k: (list(v) if isinstance(v, list) else v) for k, v in sched.state_dict().items()}

    def restore(self, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(self.model[k])
            for p, st in opt.state.items():
                saved = self.opt.get(id(p), {})
                for k, v in saved.items():
                    if torch.is_tensor(v):
                        st[k].copy_(v)
                    else:
                        st[k] = v
            for g, lr in zip(opt.param_groups, self.lr, strict=True):
                if torch.is_tensor(g["lr"]):
                    g["lr"].fill_(lr)
                else:
                    g["lr"] = lr
        sched.load_state_dict(self.sched)


# --------------------------------------------------------------------------- training


# An epoch-end checkpoint is skipped when the last one is younger than this (an epoch takes
# seconds on a GPU; writing ~100 MB of weights and Adam state each time would slow it down).
# Checkpoints every ``checkpoint_every`` steps are always written.
MIN_SAVE_INTERVAL_S = 30.0


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device, capturable: bool = False):
    """Adam, fused into one kernel (CUDA, and CPUs from torch 2.4); ``capturable`` for a CUDA-graph step.

    The same update to float32 rounding (7e-9 after three steps of CapsNet's 8.2M parameters);
    on the 2-core build machine the fused CPU step takes 7 ms instead of 19.
    """
    if device.type == "cuda":
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=capturable)
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except RuntimeError:  # torch < 2.4 has no fused CPU Adam
        return torch.optim.Adam(model.parameters(), lr=lr)


def build_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device,
    bf16: bool,
    speed: SpeedOptions,
    x0: torch.Tensor,
    y0: torch.Tensor,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One training step (forward, loss, backward, optimizer) as ``step(x, y) -> (loss, scores)``.

    Eager by default; ``speed.compile`` compiles the model; ``speed.cuda_graph`` captures the
    step as a CUDA graph. Capturing needs a few warm-up steps (they create the optimizer
    state and the kernels' workspaces); their effect on the weights and on Adam's state is
    undone in place, so a graph-trained job computes the same steps as an eager one.
    """
    fwd = torch.compile(model) if speed.compile else model

    def eager(x: torch.Tensor, y: torch.Tensor):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not speed.cuda_graph):
            out = fwd(x, y)
            loss = model.loss(out, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss, out.scores

    if not speed.cuda_graph:
        return eager
    params = list(model.parameters())
    saved_params = [p.detach().clone() for p in params]
    saved_state = {id(t): t.clone() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)}
    static_x, static_y = x0.clone(), y0.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            eager(static_x, static_y)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss, static_scores = eager(static_x, static_y)
    with torch.no_grad():  # undo the warm-up and capture steps, in place (the graph keeps the storage)
        for p, v in zip(params, saved_params, strict=True):
            p.copy_(v)
        for st in opt.state.values():
            for t in st.values():
                if torch.is_tensor(t):
                    t.copy_(saved_state[id(t)]) if id(t) in saved_state else t.zero_()

    def replay(x: torch.Tensor, y: torch.Tensor):
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        return static_loss, static_scores

    return replay


def sync_every_for(dev: torch.device) -> int:
    """Steps between reads of the loss: on a GPU a step takes milliseconds, and a read is a host
    synchronisation, so read it less often there."""
    return 100 if dev.type == "cuda" else 10


def _duration(seconds: float) -> str:
    """'45 s', '12 min', '1 h 05 min': a time left, as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def train(
    cfg: TrainConfig,
    out: str | os.PathLike = "runs",
    data_root: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    progress: bool | str = True,
    log: Callable[[str], None] = print,
    on_step: Callable[[int], None] | None = None,
    speed: SpeedOptions | None = None,
) -> TrainResult:
    """Train one model (or reuse the finished job with the same key) and return it.

    ``progress``: a progress bar on a terminal, else a plain line every tenth of the budget (a
    string is the bar's label, e.g. "[job 3/8] capsnet s1"); False: quiet.

    The job directory ``<out>/jobs/<job_name>/`` holds ``checkpoint.pt`` (written atomically
    every ``checkpoint_every`` steps and at the end of an epoch when the last checkpoint is at
    least ``MIN_SAVE_INTERVAL_S`` old; an interrupted job resumes from it) and
    ``job.json`` (config, status, timings) once finished. ``on_step(step)`` is called after
    every step (progress hooks, tests that interrupt a job). ``speed``: see
    :class:`SpeedOptions`.
    """
    cfg = cfg.validate()
    dev = resolve_device(device)
    if cfg.checkpoint is not None:  # trained elsewhere: nothing to train, no job folder
        return load_pretrained(cfg, dev)
    speed = check_device_options(dev, cfg.amp, speed)
    keep_freed_memory()  # large CPU tensors reuse mapped pages step after step (capsbench/malloc.py)
    ensure_dataset(cfg.dataset, root=data_root, split="train")  # before the job folder exists
    job_dir = Path(out) / "jobs" / cfg.job_name
    # One trainer per job: a second process that needs it (another suite, a Ray task) waits
    # and then reuses the finished checkpoint. The lock dies with its holder, so a job killed
    # mid-training is resumed by the next run; its half-written temporary files are removed.
    lock = DirLock(job_dir, "training job", wait=True,
                   on_wait=lambda holder: log(f"waiting for job {cfg.job_name}, held by {holder}"))
    with lock:
        remove_partial_files(job_dir, recursive=False)
        return _train_locked(cfg, job_dir, data_root, dev, progress, log, on_step, speed)


def _train_locked(
    cfg: TrainConfig,
    job_dir: Path,
    data_root: str | os.PathLike | None,
    dev: torch.device,
    progress: bool | str,
    log: Callable[[str], None],
    on_step: Callable[[int], None] | None,
    speed: SpeedOptions,
) -> TrainResult:
    profile = get_profile(cfg.profile)
    proto = PROTOCOLS.get(cfg.protocol)
    ckpt_path = job_dir / "checkpoint.pt"
    job_json = job_dir / "job.json"

    train_set = ensure_dataset(cfg.dataset, root=data_root, split="train")
    sums = data_checksums(cfg.dataset, root=data_root)

    seed_everything(cfg.seed)
    model = build_model(cfg, dev)

    if job_json.exists() and ckpt_path.exists():
        meta = _job_meta(job_json)
        if meta is None:
            log(f"warning: ignoring unreadable {job_json}; the job resumes from its checkpoint or starts over")
        elif meta.get("status") == "finished" and meta.get("key") == cfg.key:
            try:
                reused = load_finished(cfg, job_dir.parent.parent, dev)
            except TrainingError as e:  # a damaged checkpoint: the finished job is lost, train it again
                log(f"warning: {e}; training it again")
            else:
                log(f"reusing finished job {job_dir}")
                reused.data_checksums = sums
                return reused

    train_idx, val_idx = validation_split(train_set.labels)
    if cfg.train_limit is not None:
        train_idx = train_idx[: cfg.train_limit]
    images, labels = train_set.images[train_idx], train_set.labels[train_idx]
    n = images.shape[0]
    split = job_split(train_set.labels.numel(), train_idx, val_idx, cfg.train_limit)
    total_steps, bs = cfg.resolved(n)
    budget_hook = getattr(model, "set_training_steps", None)
    if callable(budget_hook):  # a model with a schedule over training (em_capsnet's spread-loss margin)
        budget_hook(total_steps)
    # With --match-accuracy the profile's budget is an upper bound: training stops the first
    # time validation accuracy reaches the target; a model that never reaches it is recorded as such.
    steps_per_epoch = math.ceil(n / bs)

    lr = cfg.lr if cfg.lr is not None else profile.lr_for(cfg.model)
    channels_last = channels_last_for(model, dev, speed.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, lr, dev, capturable=speed.cuda_graph)
    if profile.lr_schedule == "linear":  # to 0 at the end of the budget
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total_steps))
    else:  # continuous exponential decay, as tf.train.exponential_decay without staircase
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cfg.lr_decay ** (s / cfg.lr_decay_steps))

    step, elapsed, history, stopped = 0, 0.0, [], None
    if ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location=dev, weights_only=False)
        except Exception as e:  # a checkpoint we cannot read is not worth losing the run over
            log(f"warning: ignoring unreadable checkpoint {ckpt_path} ({e}); starting over")
            state = None
        if state is not None and state.get("key") == cfg.key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            step, elapsed, history = state["step"], state["elapsed"], state.get("history", [])
            log(f"resuming {cfg.job_name} at step {step}/{total_steps}")
    if speed.cuda_graph:  # the graph reads the rate from a device tensor the schedule fills
        for group in opt.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=dev)

    images = images.to(dev)  # uint8, resident on the device
    labels = labels.to(dev)
    match_x = match_y = curve_x = curve_y = far_x = far_y = None
    val_images, val_labels = train_set.images[val_idx], train_set.labels[val_idx]
    if cfg.match_accuracy is not None:
        # validation digits placed as the protocol trains them, the same placement for every
        # model and seed (so two models are matched on the same inputs)
        match_x, match_y = proto.augment(to_float(val_images), _generator(7919)), val_labels
        if len(val_labels) > MATCH_FAR_SUBSET:
            far = stratified_sample(val_labels, MATCH_FAR_SUBSET, seed=0, tag="match-far")
            far_x, far_y = match_x[far], match_y[far]
    if speed.curve:  # validation digits as the protocol's clean cell shows test digits
        curve_x, curve_y = proto.clean(to_float(val_images)), val_labels
    match_acc = None
    near = False  # within NEAR_TARGET of the target at the last check of the whole split
    last_check: tuple[int, float] | None = None  # (step, accuracy) of the last check
    max_slope = 0.0  # the steepest accuracy gain per step between two checks so far
    next_check = cfg.match_eval_every
    tolerance = profile.match_tolerance
    at_check: _TrainState | None = None  # the state at the last check, to go back to on an overshoot
    at_check_near = False
    replay_until = 0  # after going back: a check after every step up to the step that overshot
    crossed_at: int | None = None  # the step a single update jumped past the band, if one did

    def save(finished: bool) -> None:
        atomic_torch_save(
            {
                "key": cfg.key,
                "config": asdict(cfg),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "step": step,
                "elapsed": elapsed,
                "history": history,
                "finished": finished,
            },
            ckpt_path,
        )

    job_dir.mkdir(parents=True, exist_ok=True)
    model.train()
    bar = None
    label = progress if isinstance(progress, str) else cfg.model
    plain_every = 0  # not a terminal: a plain line every tenth of the budget, no carriage returns
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=label, unit="step", leave=False)
    elif progress:
        plain_every = max(sync_every_for(dev), -(-total_steps // 10))
    started_at, started_step = time.perf_counter(), step
    if dev.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    sync_every = sync_every_for(dev)
    one_step = short_step = None  # built at the first step (a CUDA graph captures a real batch)
    t_mark = time.perf_counter()
    last_save = -math.inf  # epoch-end checkpoints at most every MIN_SAVE_INTERVAL_S seconds
    seen_since = 0
    run_loss = run_acc = 0.0
    logged = 0
    perm, perm_epoch = None, -1
    while step < total_steps:
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:
            perm = torch.randperm(n, generator=_generator(cfg.seed, epoch)).to(dev)
            perm_epoch = epoch
        idx = perm[pos * bs : (pos + 1) * bs]
        x = proto.augment(to_float(images[idx]), _generator(cfg.seed, epoch, pos, 1))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[idx]
        if one_step is None:
            one_step = build_step(model, opt, dev, cfg.amp == "bf16", speed, x, y)
        if speed.cuda_graph and idx.shape[0] != bs:  # a graph has fixed shapes: a short
            if short_step is None:  # last batch of an epoch runs eagerly
                short_step = build_step(model, opt, dev, cfg.amp == "bf16", SpeedOptions(), x, y)
            loss, scores = short_step(x, y)
        else:
            loss, scores = one_step(x, y)
        sched.step()
        step += 1
        seen_since += idx.shape[0]
        run_loss += loss.detach()
        run_acc += (scores.detach().argmax(1) == y).float().mean()
        logged += 1
        if step % sync_every == 0 or step == total_steps:
            mean_loss = (run_loss / logged).item()  # one host sync per sync_every steps
            if not math.isfinite(mean_loss):
                raise TrainingError(
                    f"{cfg.model}: training loss became {mean_loss} by step {step}; the job "
                    f"stopped (try a lower --lr than {lr:g}, or check the input data)"
                )
            now = time.perf_counter()
            elapsed += now - t_mark
            ips = seen_since / max(now - t_mark, 1e-9)
            history.append({"step": step, "loss": mean_loss, "train_acc": (run_acc / logged).item()})
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{history[-1]['train_acc']:.3f}", img_s=f"{ips:.0f}")
                bar.update(step - bar.n)
            elif plain_every and (step % plain_every < sync_every or step == total_steps):
                spent = now - started_at
                left = spent / max(step - started_step, 1) * (total_steps - step)
                log(f"{label}: step {step:,}/{total_steps:,} ({100 * step / total_steps:.0f}%), loss {mean_loss:.4f}, "
                    f"{ips:.0f} images/s, about {_duration(left)} left")
            run_loss = run_acc = 0.0
            logged = seen_since = 0
            t_mark = time.perf_counter()
        if match_x is not None and (step >= next_check or step == total_steps):
            whole = near or step == total_steps or far_x is None or crossed_at is not None
            if not whole:  # far from the target: a subset tells whether the whole split is worth it
                far_acc = accuracy(predict(model, far_x, device=dev, amp=cfg.amp)[0], far_y)
                history.append({"step": step, "match_val_acc_subset": far_acc})
                whole = far_acc >= cfg.match_accuracy - NEAR_TARGET
            if whole:
                match_acc = accuracy(predict(model, match_x, device=dev, amp=cfg.amp)[0], match_y)
                history.append({"step": step, "match_val_acc": match_acc})
                overshot = match_acc > cfg.match_accuracy + tolerance + 1e-12
                if overshot and at_check is not None and last_check is not None and step - last_check[0] > 1:
                    # past the tolerance between two checks: back to the last check, then step by step
                    log(f"{cfg.model}: validation accuracy {match_acc:.4f} at step {step} is past the target "
                        f"{cfg.match_accuracy} + {tolerance:g}; replaying from step {last_check[0]} with a check "
                        "after every step")
                    at_check.restore(model, opt, sched)
                    replay_until, step = step, last_check[0]
                    history = [h for h in history if h["step"] <= step]
                    history.append({"step": step, "match_rewind_from": replay_until, "overshoot_val_acc": match_acc})
                    near, next_check = at_check_near, step + 1
                    perm_epoch, run_loss, run_acc, logged, seen_since = -1, 0.0, 0.0, 0, 0
                    t_mark = time.perf_counter()
                    continue
                if match_acc >= cfg.match_accuracy and not overshot:
                    stopped = step
                    log(f"{cfg.model}: validation accuracy {match_acc:.4f} >= {cfg.match_accuracy} at step {step}")
                    break
                if overshot and crossed_at is None:  # one step jumped past the band: search on, step by step
                    crossed_at = step
                    log(f"{cfg.model}: validation accuracy {match_acc:.4f} at step {step} jumped past the target "
                        f"{cfg.match_accuracy} + {tolerance:g} in one step; checking every step for up to "
                        f"{MATCH_SEARCH_STEPS} more")
                if crossed_at is not None and (step - crossed_at >= MATCH_SEARCH_STEPS or step == total_steps):
                    stopped = step
                    log(f"{cfg.model}: no step within {MATCH_SEARCH_STEPS} of step {crossed_at} had a validation "
                        f"accuracy in [{cfg.match_accuracy}, {cfg.match_accuracy} + {tolerance:g}]; stopped "
                        f"unmatched at {match_acc:.4f}")
                    break
                near = match_acc >= cfg.match_accuracy - NEAR_TARGET
            t_mark = time.perf_counter()
            # far from the target: every match_eval_every steps, or sooner when the steepest rise
            # seen between two checks would reach the target earlier (after half those steps), so a
            # steep, noisy curve is not overshot
            now = match_acc if whole else far_acc
            gap = fine = max(1, cfg.match_eval_every // NEAR_EVERY)
            if last_check is not None and now > last_check[1]:
                max_slope = max(max_slope, (now - last_check[1]) / (step - last_check[0]))
            if not near:
                gap = cfg.match_eval_every
                if max_slope > 0:
                    gap = int(min(gap, max(fine, (cfg.match_accuracy - now) / max_slope / 2)))
            if step < replay_until or crossed_at is not None:
                gap = 1
            last_check = (step, now)
            next_check = step + gap
            at_check, at_check_near = _TrainState(model, opt, sched), near
        if curve_x is not None and step % steps_per_epoch == 0:
            acc = accuracy(predict(model, curve_x, device=dev, amp=cfg.amp)[0], curve_y)
            history.append({"step": step, "epoch": step / steps_per_epoch, "val_acc": acc})
            log(f"{cfg.model}: epoch {step / steps_per_epoch:g} step {step}: validation accuracy {acc:.4f}")
            t_mark = time.perf_counter()
        epoch_end = step % steps_per_epoch == 0 and time.perf_counter() - last_save >= MIN_SAVE_INTERVAL_S
        if step % profile.checkpoint_every == 0 or epoch_end:
            save(False)
            last_save = t_mark = time.perf_counter()
        if on_step is not None:
            on_step(step)
    if bar is not None:
        bar.close()
    images_seen = step * bs
    ips_total = images_seen / elapsed if elapsed > 0 else float("nan")
    save(True)
    write_json(
        job_json,
        {
            "status": "finished",
            "key": cfg.key,
            "config": asdict(cfg),
            "steps_done": step,
            "batch_size": bs,
            "train_time_s": elapsed,
            "images_per_s": ips_total,
            "stopped_early_at": stopped,
            "match_accuracy": cfg.match_accuracy,
            "match_tolerance": profile.match_tolerance if cfg.match_accuracy is not None else None,
            "match_val_accuracy": match_acc,
            "split": split,
            "history": history,
            "params": count_parameters(model),
            "device": str(dev),
            "channels_last": channels_last,
            "environment": environment_info(dev),
            "data_checksums": sums,
        },
    )
    return TrainResult(cfg, model, job_dir, step, elapsed, ips_total, False, stopped, history, sums,
                       match_val_accuracy=match_acc, split=split)


def train_with_retry(
    cfg: TrainConfig,
    out: str | os.PathLike = "runs",
    data_root: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    progress: bool | str = True,
    log: Callable[[str], None] = print,
    on_step: Callable[[int], None] | None = None,
    speed: SpeedOptions | None = None,
) -> TrainResult:
    """:func:`train`, retried at half the batch size when the device runs out of memory.

    Each retry is a job of its own (the batch size is part of the key) and is recorded in
    ``TrainResult.oom_retries``. A fixed step budget doubles with each halving, so the job
    still sees as many images. Below a batch size of 1 the error is raised as a
    :class:`TrainingError` naming the sizes tried.
    """
    retries: list[dict[str, Any]] = []
    train_size = 60_000
    while True:
        try:
            result = train(cfg, out=out, data_root=data_root, device=device, progress=progress,
                           log=log, on_step=on_step, speed=speed)
            result.oom_retries = retries
            return result
        except torch.OutOfMemoryError as e:
            _, bs = cfg.resolved(train_size)
            retries.append({"batch_size": bs, "error": first_line(e) or "out of memory"})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if bs <= 1:
                tried = ", ".join(str(r["batch_size"]) for r in retries)
                raise TrainingError(
                    f"{cfg.model}: out of memory at every batch size tried ({tried}); use a "
                    f"smaller model or input, or a device with more memory"
                ) from None
            log(f"{cfg.model} seed {cfg.seed}: out of memory at batch size {bs} ({retries[-1]['error']}); "
                f"retrying at {bs // 2}")
            steps, _ = cfg.resolved(train_size)
            smaller = replace(cfg, batch_size=bs // 2)
            if smaller.resolved(train_size)[0] == steps:  # a fixed step budget: keep the images seen
                smaller = replace(smaller, steps=2 * steps)
            cfg = smaller
