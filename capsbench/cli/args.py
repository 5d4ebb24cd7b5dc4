"""What the sub-commands share: the one-line-error parser, number parsers, common flags."""

from __future__ import annotations

import argparse
import math


class DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` with each option's default, where it has one worth saying (not None or off)
    and its help text does not already name it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        if (action.option_strings and d not in (None, False, argparse.SUPPRESS) and "(default" not in text
                and not isinstance(action, argparse._VersionAction)):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other capsbench error.

    argparse prints the whole usage block before its message; on a terminal the one line that
    matters then scrolls past. The usage stays one ``--help`` away, and the line says so. Its
    ``--help`` shows each option's default (:class:`DefaultsFormatter`), in subcommands too.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {lo}, got {v}")
        return v

    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return v


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """The flags that choose how training runs on a GPU (``capsbench train`` and ``run``)."""
    p.add_argument("--amp", choices=["bf16"], default=None, help="train under bf16 autocast (CUDA only)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC weights and inputs (faster on GPUs). Default: on CPUs for the models whose "
                        "convolutions run faster that way (efficientnet_b0, lenet5), off elsewhere")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole training step as one CUDA graph and replay it (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")


def speed_options(args: argparse.Namespace, curve: bool = False):
    """The :class:`~capsbench.train.device.SpeedOptions` of the flags :func:`add_speed_args` adds."""
    from capsbench.train.device import SpeedOptions

    return SpeedOptions(channels_last=args.channels_last, cuda_graph=args.cuda_graph, compile=args.compile,
                        curve=curve)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None, help="data root (else $CAPSBENCH_DATA, else ./datasets)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N")
    p.add_argument("--out", default="runs", help="output folder (default: runs/)")


def name_list(text: str | None, option: str) -> list[str] | None:
    """A comma-separated option value as a list without repeats (None: the option was not given).
    A value with no names in it (``--models ""``) is an error, not a silent "use the defaults"."""
    from capsbench.errors import ConfigError

    if text is None:
        return None
    names = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not names:
        raise ConfigError(f"{option} is empty; name at least one, or leave {option} out for the defaults")
    return names
