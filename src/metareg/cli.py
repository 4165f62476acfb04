"""The ``metareg`` command. Every user error ends in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError, MetaregError
from .nets import available as backbones
from .perturb import available as perturbations


# ----------------------------------------------------------------------------------- arguments
class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the README's promise), with a pointer to ``--help``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(minimum: int, maximum: int = 2**63 - 1):
    """An argparse type: an integer in ``minimum`` .. ``maximum`` (by default any count, step or
    seed torch can hold: 64 bits)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum} (2**63 - 1), got {value}")
        return value

    return parse


POSITIVE, NONNEGATIVE = _count(1), _count(0)


def _config_flags(p: argparse.ArgumentParser, *, resume: bool = False) -> None:
    p.add_argument("--preset", help="named preset (see `metareg presets`)")
    p.add_argument("--config", help="YAML or JSON config file, merged over the preset")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set inner.lr=0.1 (repeatable)",
    )
    p.add_argument("--data-root", help="folder holding the data set (default $METAREG_DATA_ROOT/<name>)")
    p.add_argument("--seed", type=NONNEGATIVE, help="training seed")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
        p.add_argument(
            "--time-budget",
            type=POSITIVE,
            metavar="SECONDS",
            help="stop at the first step after SECONDS of wall-clock time, with a checkpoint; --resume "
            "continues exactly",
        )


def _eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--episodes", type=POSITIVE, help="test episodes (default 1000)")
    p.add_argument("--shot", type=POSITIVE, help="shots per class at meta-test time (default: the training shots)")
    p.add_argument(
        "--test-seed", type=NONNEGATIVE, help="seed of the test episode stream (default: the config's eval.seed)"
    )
    p.add_argument(
        "--mc-samples",
        type=POSITIVE,
        help="noise samples per inner step at meta-test time (default: the config's inner.eval_mc_samples)",
    )
    _attack_flags(p)
    p.add_argument("--fgsm", type=float, metavar="EPS", help="short for --attack fgsm --epsilon EPS")


def _attack_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--attack",
        choices=["fgsm", "pgd-linf", "pgd-l2", "pgd-l1"],
        help="score on attacked query (or test) images: FGSM, or PGD in an L-infinity, L2 or L1 ball",
    )
    p.add_argument("--epsilon", type=float, help="the attack's size (the ball's radius; images are in [0, 1])")
    p.add_argument(
        "--attack-steps", type=POSITIVE, default=10, help="PGD steps (default 10; step size 2.5 epsilon / steps)"
    )
    p.add_argument(
        "--eot",
        type=POSITIVE,
        default=1,
        metavar="M",
        help="Expectation over Transformation: each step's gradient averaged over M draws of a stochastic "
        "model's noise",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="metareg", description="Meta-learned regularization: train, test and compare meta-learners.")
    parser.add_argument("--version", action="version", version=f"metareg {__version__}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="meta-train (then meta-test) a config into a run folder")
    _config_flags(p, resume=True)
    p.add_argument("--out", help="run folder (default runs/<preset or data>)")
    p.add_argument(
        "--steps", "--iterations", dest="steps", type=NONNEGATIVE, help="meta-training iterations (train.steps)"
    )
    _eval_flags(p)
    p.add_argument("--no-test", action="store_true", help="skip the meta-test after training")

    p = sub.add_parser("test", help="meta-test a checkpoint: score +- 95%% CI over fixed episodes")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run folder, its checkpoint.json, or builtin:NAME (see `metareg checkpoints`)",
    )
    p.add_argument("--data-root", help="folder holding the data set")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--out", help="where to write the per-episode results (default <run>/test.json)")
    _eval_flags(p)

    p = sub.add_parser("compare", help="paired comparison of two models on the same episodes")
    p.add_argument("a", help="run folder, checkpoint.json, or a result file written by `metareg test`")
    p.add_argument("b", help="idem")
    p.add_argument("--data-root", help="folder holding the data set")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    _eval_flags(p)

    sub.add_parser("presets", help="list the named presets and the paper rows they reproduce")

    p = sub.add_parser(
        "checkpoints",
        help="list the meta-trained checkpoints that ship with metareg (test them with "
        "`metareg test --checkpoint builtin:NAME`)",
    )
    p.add_argument("--pack", metavar="RUN", help="maintainers: ship the tested run RUN as a built-in checkpoint")
    p.add_argument("--name", help="with --pack: its name")
    p.add_argument(
        "--command",
        dest="train_command",
        help="with --pack: the command that trained it (default: the one it recorded)",
    )
    p.add_argument(
        "--machine", default="", help="with --pack: where it was trained (e.g. '2 CPU cores' or the GPU's name)"
    )
    p.add_argument(
        "--note", default="", help="with --pack: what a user must know (e.g. 'CPU budget: 800 of 60000 iterations')"
    )

    p = sub.add_parser("download", help="download a data set's official archives (checksums verified)")
    p.add_argument("dataset", choices=["omniglot"])
    p.add_argument("--to", required=True, help="destination folder")
    p.add_argument("--base-url", help="a mirror holding the same archives (any URL urllib opens, e.g. file:///...)")

    p = sub.add_parser(
        "perturb", help="MetaPerturb: meta-train a perturbation over source tasks; train any CNN with it (transfer)"
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    for action, text in (
        (
            "meta-train",
            "meta-train phi jointly over a source data set's class-wise tasks (Algorithm 1; "
            "several processes with torchrun)",
        ),
        (
            "transfer",
            "train and test a network on a target data set with a fixed phi, none, or fine-tuned (Algorithm 2)",
        ),
    ):
        a = actions.add_parser(action, help=text, description=text)
        _config_flags(a, resume=True)
        a.add_argument("--out", help="run folder (default runs/<preset or data>)")
        a.add_argument("--data", help="data set name (data.name; see the README for the layouts)")
        a.add_argument("--arch", help=f"backbone (model.backbone): {', '.join(backbones())}")
        a.add_argument("--steps", type=NONNEGATIVE, help="training steps (train.steps)")
        a.add_argument(
            "--batch-size", type=POSITIVE, help="images per batch (per task when meta-training) (train.batch_size)"
        )
        a.add_argument(
            "--perturbation",
            choices=perturbations(),
            metavar="NAME",
            help=f"the perturbation in every block's slot (perturb.name; default metaperturb): "
            f"{', '.join(perturbations())}"
            + (
                "; none is the Base baseline"
                if action == "transfer"
                else "; one with parameters, which are meta-learned"
            ),
        )
        if action == "transfer":
            a.add_argument("--phi", help="'builtin' (default), a meta-train run folder, or its phi.json")
            a.add_argument(
                "--init-from", help="fine-tune: a transfer run of the same backbone whose convolutions start this one"
            )
            a.add_argument(
                "--mc-samples", type=POSITIVE, help="Monte-Carlo samples of the final test predictions (default 100)"
            )
            a.add_argument(
                "--select",
                action="store_const",
                const=True,
                help="first choose the perturbation's hyperparameters on a validation split of the training images",
            )
            a.add_argument(
                "--against-base",
                action="store_const",
                const=True,
                help="also train the Base network (same data, seed, test images) into OUT-base and print the "
                "paired difference "
                "(on by default in the quickstart)",
            )
        else:
            a.add_argument("--tasks", type=POSITIVE, help="number of source tasks T (default 10)")
    a = actions.add_parser("info", help="the provenance of a stored phi (source data, backbone, command)")
    a.add_argument("phi", nargs="?", default="builtin", help="'builtin', a meta-train run folder or its phi.json")

    p = sub.add_parser(
        "plot",
        help="plots: `curves RUN [RUN ...]` (learning curves from log.csv), `features RUN` (a "
        "layer's activations and perturbed activations), `boundary RUN` (a task's decision boundary), "
        "`scales RUN [RUN ...]` (MetaPerturb's learned scale s per block and channel), `reliability RUN [RUN ...]` "
        "(calibration of episodic or transfer runs), `robustness RUN [RUN ...] --attack A --epsilons E ...` "
        "(robust accuracy "
        "against the attack's size), `loss-surface RUN [RUN ...]` (MetaPerturb Figure 8: transfer runs' training loss "
        "along filter-normalized random directions)",
    )
    p.add_argument(
        "kind", choices=["curves", "features", "boundary", "scales", "reliability", "robustness", "loss-surface"]
    )
    p.add_argument("runs", nargs="+", help="run folders (or log.csv files); features and boundary take one run")
    p.add_argument("--out", help="PNG to write (default <kind>.png)")
    p.add_argument(
        "--episode",
        type=NONNEGATIVE,
        default=0,
        help="features/boundary: which episode of the fixed test stream (default 0)",
    )
    p.add_argument("--layer", type=NONNEGATIVE, default=0, help="features: the conv block (default 0)")
    p.add_argument("--channel", type=NONNEGATIVE, help="features: the channel (default: the most active one)")
    p.add_argument("--samples", type=POSITIVE, default=4, help="features/boundary: noise draws to show (default 4)")
    p.add_argument(
        "--classes", type=NONNEGATIVE, nargs=2, default=(0, 1), help="boundary: the two classes (default 0 1)"
    )
    _attack_flags(p)
    p.add_argument(
        "--epsilons", type=float, nargs="+", help="robustness: the attack sizes (default 0 and 4 sizes up to --epsilon)"
    )
    p.add_argument(
        "--episodes", type=POSITIVE, default=200, help="robustness: test episodes of episodic runs (default 200)"
    )
    p.add_argument(
        "--mc-samples", type=POSITIVE, help="robustness: MC samples of a transfer run's predictions (default: its own)"
    )
    p.add_argument("--grid", type=_count(2), default=11, help="loss-surface: points per axis (default 11)")
    p.add_argument(
        "--span", type=float, default=1.0, help="loss-surface: the grid covers [-span, span] per direction (default 1)"
    )
    p.add_argument(
        "--images", type=POSITIVE, default=256, help="loss-surface: training images of the fixed batch (default 256)"
    )

    from .runs.reproduce import EXPERIMENTS

    p = sub.add_parser(
        "reproduce",
        help="run a paper's table or figure as a resumable grid of runs",
        description="Run a paper's table or figure as a resumable grid of runs. Experiments:\n"
        + "\n".join(f"  {name:<26} {e.source.split(' (')[0]}" for name, e in EXPERIMENTS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("experiment", nargs="?", help="experiment name, one of those above (omit to list them)")
    p.add_argument("--out", help="folder for the runs and <experiment>.md (default runs/<experiment>)")
    p.add_argument(
        "--steps",
        "--iterations",
        dest="steps",
        type=POSITIVE,
        help="training steps per run (default: the presets' full schedule)",
    )
    p.add_argument("--episodes", type=POSITIVE, default=1000, help="test tasks per number (default 1000)")
    p.add_argument("--jobs", type=POSITIVE, default=2, help="runs trained at once, one thread each (default 2)")
    p.add_argument(
        "--time-budget",
        type=POSITIVE,
        metavar="SECONDS",
        help="stop the grid after SECONDS (runs checkpoint and stop; running it again continues)",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print each run's progress, speed and time left, and how to continue; run nothing",
    )

    p = sub.add_parser("bench", help="meta-training speed against a plain per-task reference loop")
    p.add_argument("--iterations", type=POSITIVE, default=3, help="timed meta-iterations per implementation")
    p.add_argument(
        "--shape",
        choices=["omniglot-20w1s", "miniimagenet-5w1s", "miniimagenet-5w5s-resnet12"],
        help="the presets' task shape (default omniglot-20w1s; on CUDA both unless one is named; --memory: "
        "omniglot-20w1s and miniimagenet-5w5s-resnet12, both unless one is named)",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="peak memory and time of second-order MAML: plain loop, learn2learn, higher, the engine with stored "
        "and with recomputed inner steps",
    )
    p.add_argument("--memory-steps", type=POSITIVE, nargs="+", metavar="K", help="--memory: inner steps (default 5 10)")
    p.add_argument(
        "--memory-limit",
        type=float,
        default=16.0,
        metavar="GB",
        help="--memory on a CPU: each implementation's heap cap (beyond it: reported out of memory)",
    )
    p.add_argument(
        "--extra-path",
        metavar="DIR",
        help="--memory: a folder with learn2learn and higher (pip install --no-deps --target DIR learn2learn higher)",
    )
    p.add_argument("--way", type=POSITIVE, help="override the shape's classes per task")
    p.add_argument("--shot", type=POSITIVE)
    p.add_argument("--query", type=POSITIVE)
    p.add_argument("--channels", type=POSITIVE, help="Conv4 width")
    p.add_argument("--image-size", type=POSITIVE, help="image side (default: the shape's; joint: 32)")
    p.add_argument("--in-channels", type=POSITIVE)
    p.add_argument("--meta-batch", type=POSITIVE, default=4)
    p.add_argument("--steps", type=POSITIVE, default=5)
    p.add_argument(
        "--mc",
        type=NONNEGATIVE,
        default=0,
        metavar="S",
        help="also time Meta-Dropout's meta-test with S noise samples per inner step, sequential and batched",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-check", action="store_true", help="skip the float64 meta-gradient comparison")
    p.add_argument(
        "--scheme",
        choices=["bilevel", "joint"],
        default="bilevel",
        help="bilevel: MAML meta-gradient (default); joint: one step of MetaPerturb's joint meta-training",
    )
    p.add_argument("--arch", default="resnet20", help="joint: the task networks' backbone")
    p.add_argument("--tasks", type=POSITIVE, default=10, help="joint: number of task networks")
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="joint: images per task and pass")
    p.add_argument("--profile", action="store_true", help="print the engine's operator profile")
    return parser


# ------------------------------------------------------------------------------------ commands
def _run_config(args: argparse.Namespace, kind: str) -> Any:
    """The config of the run the flags describe: a new run (preset <- --config <- --set <- flags) or,
    with ``--resume``, the stored one with the few changes a resumed run allows. The one resume path
    of every kind of run."""
    from .config import parse_assignment
    from .runs import KINDS
    from .runs.common import resolve, resumed

    spec = KINDS[kind]
    flags = {key: getattr(args, flag, None) for flag, key in spec.flags.items()}
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out, the run folder to continue")
        changing = {key for key, value in flags.items() if value is not None} - set(spec.resume_flags.values())
        if args.preset or args.config or args.overrides or changing:
            allowed = ", ".join("--" + flag.replace("_", "-") for flag in spec.resume_flags)
            raise ConfigError(f"--resume takes the config stored in the run folder; only {allowed} may change")
        return resumed(args.out, kind, {key: getattr(args, flag, None) for flag, key in spec.resume_flags.items()})
    # Options belong to a backbone or a data set: --arch and --data start from none (--set still applies).
    overrides = [parse_assignment("model.options={}")] if getattr(args, "arch", None) else []
    overrides += [parse_assignment("data.options={}")] if getattr(args, "data", None) else []
    overrides += [parse_assignment(text) for text in args.overrides]
    overrides += [parse_assignment(f"{key}={json.dumps(value)}") for key, value in flags.items() if value is not None]
    # The built-in quickstart runs when nothing says what to train; --data or --config start from the
    # plain defaults (the papers' hyperparameters).
    default = spec.default_preset if not (args.config or getattr(args, "data", None)) else None
    return resolve(args.preset or default, args.config, overrides, schema=spec.schema)


def _format(result: Any, regression: bool) -> str:
    return result.format(1.0, 4) if regression else result.format(100.0, 2) + " %"


def _is_regression(protocol: dict[str, Any]) -> bool:
    return protocol.get("kind") != "transfer" and protocol.get("way") is None


def _unit(protocol: dict[str, Any]) -> str:
    return "test images" if protocol.get("kind") == "transfer" else "episodes"


def _describe(protocol: dict[str, Any]) -> str:
    if protocol.get("kind") == "transfer":
        train = (
            f"{protocol['train_per_class']} training images per class"
            if protocol.get("train_per_class")
            else f"its {protocol['train_split']} split"
        )
        return (
            f"{protocol['data']} {protocol['test_split']} split, {protocol['classes']} classes, trained on {train}, "
            f"{protocol['test_images']} test images ({protocol['image_size']}px, data seed {protocol['data_seed']})"
        )
    task = (
        f"{protocol['shot']}-shot" if protocol.get("way") is None else f"{protocol['way']}-way {protocol['shot']}-shot"
    )
    attack = f", query images attacked by {protocol['attack']}" if protocol.get("attack") else ""
    return (
        f"{protocol['data']} {protocol['split']} split, {task}, {protocol['episodes']} episodes, seed "
        f"{protocol['seed']}{attack}"
    )


def _report(label: str, result: Any) -> None:
    regression = _is_regression(result.protocol)
    metric = "MSE" if regression else "accuracy"
    print(f"{label} {metric}: {_format(result.estimate, regression)} (mean +- 95% CI; {_describe(result.protocol)})")
    if result.calibration:
        print(
            f"{label} calibration: NLL {result.calibration['nll']:.4f}, ECE {result.calibration['ece']:.4f} (15 "
            f"bins, over all query predictions)"
        )


def _stopped(args: argparse.Namespace, step: int, total: int) -> None:
    """The one line of a run that stopped at its time budget: how far it got and how to go on."""
    print(
        f"time budget of {args.time_budget} s reached: stopped at step {step} of {total} with a checkpoint; "
        f"continue with: {how_to_continue(args)} --time-budget {args.time_budget}"
    )


# ------------------------------------------------------------------------ stopped before the end
def _resume_run(command: str) -> Any:
    """How a run of ``command`` goes on: ``--resume`` once it has started (a checkpoint, or a
    transfer's ``--select`` candidates), the same command again before."""

    def hint(args: argparse.Namespace) -> str:
        out = getattr(args, "run_folder", None)
        if out is None:
            return "run the same command again"
        if (out / "checkpoint.json").exists() or (out / "selection").is_dir():
            return f"{command} --out {out} --resume"
        return f"run the same command again (no checkpoint was written yet in {out})"

    return hint


#: What continues each command after it stopped early (Ctrl-C, a time budget): one table, so that
#: every command names its own way on (a test is simply run again: it writes only at its end).
CONTINUE: dict[str, Any] = {
    "train": _resume_run("metareg train"),
    "perturb meta-train": _resume_run("metareg perturb meta-train"),
    "perturb transfer": _resume_run("metareg perturb transfer"),
    "reproduce": lambda args: (
        f"metareg reproduce {args.experiment} --out {args.out or f'runs/{args.experiment}'} (run it again: finished "
        "runs are kept, the others resume from their checkpoints)"
    ),
    "test": lambda _args: "run the same command again (nothing was written)",
    "compare": lambda _args: "run the same command again (nothing was written)",
    "plot": lambda _args: "run the same command again (robust accuracies already measured are cached)",
    "download": lambda _args: "run the same command again (archives already verified are kept)",
}


def how_to_continue(args: argparse.Namespace) -> str:
    command = f"{args.command} {args.action}" if args.command == "perturb" else args.command
    return CONTINUE.get(command, lambda _args: "run the same command again")(args)


def cmd_train(args: argparse.Namespace) -> None:
    from .build import input_size, resolve_device
    from .meta.distributed import session
    from .runlock import run_lock
    from .runs.episodic import meta_test, save_result, train

    config = _run_config(args, "bilevel")
    out = args.run_folder = Path(args.out or f"runs/{config.preset or config.data.name}")
    attack = None if args.no_test else _attack(args)  # refused now, not after the training
    if attack is not None:
        attack.attack.check_size(input_size(config))
    # the run folder is this command's until it ends: training, then the test that writes test.json
    with session(resolve_device(config.device)) as world, run_lock(out, world):
        main = world.is_main
        if main:
            processes = (
                f" ({world.size} processes, {'nccl' if world.device.type == 'cuda' else 'gloo'})"
                if world.distributed
                else ""
            )
            print(f"run folder: {out}{processes}", file=sys.stderr)
        trainer = train(
            config, out, resume=args.resume, progress=not args.no_progress, deadline=args.deadline, world=world
        )
        if not trainer.finished:
            return _stopped(args, trainer.step, config.train.steps) if main else None
        if main:
            print(
                f"meta-trained {trainer.step} iterations in {trainer.seconds:.0f} s; checkpoint "
                f"{out / 'checkpoint.json'}"
            )
        if not args.no_test:
            result = meta_test(
                config,
                trainer.learner,
                episodes=args.episodes,
                seed=args.test_seed,
                shot=args.shot,
                progress=not args.no_progress,
                attack=attack,
                world=world,
            )
            if main:
                save_result(result, out / "test.json")
                _report("test", result)


def _model_result(
    path: str, args: argparse.Namespace, protocol_config: Any = None, world: Any = None
) -> tuple[Any, Any]:
    """(result, config): a stored result file (config None), or a checkpoint tested now
    (on ``protocol_config``'s episodes if given)."""
    from . import builtin
    from .build import input_size
    from .evaluate import EvalResult
    from .fewshot import load_learner
    from .runfolder import read_result, read_run
    from .runs.common import check
    from .runs.episodic import meta_test

    path = str(builtin.resolve(path))
    p = Path(path)
    config = None
    if not (p.is_file() and p.name != "checkpoint.json" and p.suffix == ".json"):
        kind, config = read_run(path)
        if kind == "meta-train":
            raise ConfigError(
                f"{path} is a MetaPerturb meta-training run, which has no test result; compare transfer runs"
            )
        if kind == "transfer":  # a transfer run is tested when it ends: compare its test.json
            p = (p if p.is_dir() else p.parent) / "test.json"
            if not p.is_file():
                raise ConfigError(
                    f"transfer run {path} has no test.json yet; finish it with `metareg perturb transfer --out "
                    f"{path} --resume`"
                )
    if p.is_file() and p.name != "checkpoint.json" and p.suffix == ".json":
        given = [flag for flag, value in _episode_flags(args).items() if value is not None]
        if given:  # a stored result was measured as it was: these flags would be silently ignored
            raise ConfigError(
                f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to checkpoints tested now, but {path} "
                f"is a stored result ({p}), measured when it was written"
            )
        return EvalResult.from_dict(read_result(p)), None
    if config is None:  # never: a path that is no stored result was read as a run above
        raise ConfigError(f"{path} is neither a run nor a stored result")
    if args.data_root:
        config.data.root = args.data_root
    if args.device:
        config.device = args.device
    if protocol_config is not None:  # test B on A's episodes
        config.data = protocol_config.data
        config.eval = protocol_config.eval
    if getattr(args, "mc_samples", None) is not None:
        config.inner.eval_mc_samples = args.mc_samples
    if args.episodes is not None:
        config.eval.episodes = args.episodes
    check(config)
    attack = _attack(args)
    if attack is not None:  # before anything is tested (and on every process alike)
        attack.attack.check_size(input_size(config))
    _, learner = load_learner(path, config)
    if world is not None:
        learner = learner.to(world.device)
    return meta_test(
        config,
        learner,
        episodes=args.episodes,
        seed=args.test_seed,
        shot=args.shot,
        progress=not args.no_progress,
        attack=attack,
        world=world,
    ), config


def _episode_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that say how checkpoints are tested now (None where not given)."""
    return {
        "--episodes": args.episodes,
        "--shot": args.shot,
        "--test-seed": args.test_seed,
        "--mc-samples": args.mc_samples,
        "--attack": args.attack,
        "--epsilon": args.epsilon,
        "--fgsm": args.fgsm,
    }


def _attack(args: argparse.Namespace) -> Any:
    """The query-set attack the flags ask for, or None."""
    from .evaluate.adversarial import QueryAttack, make_attack

    name, epsilon = getattr(args, "attack", None), getattr(args, "epsilon", None)
    if getattr(args, "fgsm", None) is not None:
        if name not in (None, "fgsm") or epsilon not in (None, args.fgsm):
            others = " ".join(
                [f"--attack {name}"] * (name is not None) + [f"--epsilon {epsilon:g}"] * (epsilon is not None)
            )
            raise ConfigError(
                f"--fgsm {args.fgsm:g} is short for --attack fgsm --epsilon {args.fgsm:g} and contradicts {others}: "
                "give one attack"
            )
        name, epsilon = "fgsm", args.fgsm
    if name is None:
        if epsilon is not None:
            raise ConfigError("--epsilon needs --attack")
        return None
    if epsilon is None:
        raise ConfigError(f"--attack {name} needs --epsilon, the attack's size")
    return QueryAttack(make_attack(name, epsilon, steps=args.attack_steps, draws=args.eot))


def _session(args: argparse.Namespace):
    """torchrun's process group for a meta-test (the processes share the episodes), or one process."""
    from .build import resolve_device
    from .meta.distributed import session

    return session(resolve_device(args.device or "auto"))


def cmd_test(args: argparse.Namespace) -> None:
    from contextlib import nullcontext

    from . import builtin
    from .runfolder import read_run
    from .runlock import run_lock
    from .runs.episodic import result_path, save_result

    spec = args.checkpoint
    if not builtin.is_builtin(spec) and Path(spec).is_file() and Path(spec).name != "checkpoint.json":
        raise ConfigError(
            f"--checkpoint takes a run folder, its checkpoint.json or builtin:NAME; {spec} is neither (a stored "
            "result is compared with `metareg compare`)"
        )
    if not builtin.is_builtin(spec):
        kind, _ = read_run(spec)
        if kind != "bilevel":  # its test.json belongs to the command that trained it
            raise ConfigError(
                f"{spec} is a {kind} run: `metareg test` meta-tests episodic (metareg train) runs; "
                + (
                    f"a transfer run was tested when it finished ({_folder(spec) / 'test.json'}; `metareg compare` "
                    "pairs two)"
                    if kind == "transfer"
                    else "a meta-training run has no test of its own (transfer its phi)"
                )
            )
    if args.out:
        target = Path(args.out)
    elif builtin.is_builtin(spec):  # the package folder is not the user's: write here
        target = Path(f"test-{spec[len(builtin.PREFIX) :]}.json")
    else:
        target = _folder(spec) / "test.json"
    in_run = not args.out and not builtin.is_builtin(spec)
    with _session(args) as world, run_lock(target.parent, world) if in_run else nullcontext():
        result, _ = _model_result(spec, args, world=world)
        if not world.is_main:
            return
        default = target
        if not args.out:  # a result on other episodes (or under attack) never replaces the one there
            target = result_path(target, result)
        save_result(result, target)
    _report("test", result)
    kept = f" ({default} holds a result on other episodes or conditions and is kept)" if target != default else ""
    print(f"per-episode scores written to {target}{kept}")


def _folder(spec: str) -> Path:
    """The run folder of a run folder or of its checkpoint.json."""
    return Path(spec) if Path(spec).is_dir() else Path(spec).parent


def cmd_compare(args: argparse.Namespace) -> None:
    from .runs.episodic import compare

    with _session(args) as world:
        a, config_a = _model_result(args.a, args, world=world)
        b, _ = _model_result(args.b, args, protocol_config=config_a, world=world)
    if not world.is_main:
        return
    summary = compare(a, b)
    regression = _is_regression(a.protocol)
    print(f"A {args.a}: {_format(summary['a'], regression)}")
    print(f"B {args.b}: {_format(summary['b'], regression)}")
    d = summary["difference"]
    verdict = (
        "no significant difference"
        if abs(d.mean) <= d.ci95
        else ("A is better" if (d.mean > 0) != regression else "B is better")
    )
    print(f"A - B (paired over the same {d.n} {_unit(a.protocol)}): {_format(d, regression)} -> {verdict}")
    if a.calibration and b.calibration:
        line = (
            f"NLL A {a.calibration['nll']:.4f} / B {b.calibration['nll']:.4f}, ECE A "
            f"{a.calibration['ece']:.4f} / B {b.calibration['ece']:.4f}"
        )
        if "episode_nll" in a.calibration and "episode_nll" in b.calibration:
            from .evaluate import paired_difference

            paired = paired_difference(a.calibration["episode_nll"], b.calibration["episode_nll"])
            line += f"; NLL A - B (paired): {paired.format(1, 4)}"
        print(line)
    print(f"{_unit(a.protocol)}: {_describe(a.protocol)}")


def cmd_presets(args: argparse.Namespace) -> None:  # noqa: ARG001
    from .config import SCHEMAS
    from .runs.costs import MEASURED, describe
    from .runs.presets import PRESETS

    width = max(map(len, PRESETS))
    for name, preset in PRESETS.items():
        cost = preset.cost
        if preset.timing:
            steps = preset.values["train"]["steps"]
            cost = describe(preset.timing, steps) if preset.timing in MEASURED else f"{steps} iterations (not timed)"
        print(
            f"{name:<{width}}  {preset.description}\n{'':<{width}}  run with `{SCHEMAS[preset.kind].command}`; "
            f"reproduces: {preset.paper}" + (f"\n{'':<{width}}  cost: {cost}" if cost else "")
        )
    from .runs.reproduce import EXPERIMENTS

    print("\npaper tables and figures as grids of these presets (`metareg reproduce NAME`, `--plan` for the cost):")
    width = max(map(len, EXPERIMENTS))
    for name, experiment in EXPERIMENTS.items():
        print(f"{name:<{width}}  {experiment.source}: {len(experiment.runs)} runs")


def cmd_checkpoints(args: argparse.Namespace) -> None:
    from . import builtin
    from .checkpoint import read_checkpoint_meta
    from .runs.packing import pack

    if args.pack:
        if not args.name:
            raise ConfigError("--pack needs --name, the built-in checkpoint's name")
        command = args.train_command or read_checkpoint_meta(args.pack)[1].get("command") or ""
        print(f"shipped as {pack(args.pack, args.name, command=command, machine=args.machine, note=args.note)}")
        return
    names = builtin.available()
    if not names:
        print("no built-in checkpoints ship with this metareg")
    for name in names:
        r = builtin.provenance(name)
        t = r["test"]
        scale = 100 if t["protocol"].get("way") else 1
        print(
            f"builtin:{name}  ({r['preset']}, {r['iterations']} meta-iterations, "
            f"{r['training_seconds'] / 60:.0f} min on {r['machine']})\n"
            f"  test: {t['mean'] * scale:.2f} +- {t['ci95'] * scale:.2f} over {t['episodes']} episodes (seed "
            f"{t['protocol'].get('seed')}, "
            f"S = {t['protocol'].get('mc_samples')})\n  made by: {r['command']}\n  at git revision {r['git_revision']}"
            + (f"\n  note: {r['note']}" if r.get("note") else "")
        )


def cmd_download(args: argparse.Namespace) -> None:
    from .data import download_omniglot

    options = {"base_url": args.base_url} if args.base_url else {}
    paths = download_omniglot(Path(args.to), progress=not args.no_progress, **options)
    for path in paths:
        print(path)
    print(f"Omniglot is ready: use --data-root {args.to} --preset omniglot-20w1s")


def cmd_plot(args: argparse.Namespace) -> None:
    out = args.out or f"{args.kind}.png"
    if args.kind == "curves":
        from .viz.curves import plot_curves

        print(f"wrote {plot_curves(args.runs, out)}")
        return
    if args.kind == "scales":
        from .runs.transfer import run_scales
        from .viz.scales import plot_scales

        print(f"wrote {plot_scales([run_scales(run) for run in args.runs], out)}")
        return
    if args.kind == "reliability":
        from .viz.reliability import plot_reliability

        print(f"wrote {plot_reliability(args.runs, out)}")
        return
    if args.kind == "loss-surface":
        from .runs.surface import run_loss_surface
        from .viz.surface import flatness, plot_loss_surfaces

        if not args.span > 0:
            raise ConfigError(f"--span must be positive, got {args.span}")
        surfaces = [run_loss_surface(run, points=args.grid, span=args.span, images=args.images) for run in args.runs]
        for surface in surfaces:
            print(f"{surface['label']}: mean loss increase over the grid {flatness(surface):.4f}")
        print(f"wrote {plot_loss_surfaces(surfaces, out)}")
        return
    if args.kind == "robustness":
        from .runs.robustness import robust_accuracy
        from .viz.robustness import plot_robustness

        if not args.attack or not (args.epsilons or args.epsilon):
            raise ConfigError("plot robustness needs --attack and --epsilons (or --epsilon, the largest size)")
        epsilons = args.epsilons or [args.epsilon * k / 4 for k in range(5)]
        curves = {}
        for run in args.runs:
            accuracies = [
                robust_accuracy(
                    run,
                    args.attack,
                    e,
                    episodes=args.episodes,
                    steps=args.attack_steps,
                    draws=args.eot,
                    mc_samples=args.mc_samples,
                    progress=not args.no_progress,
                )
                for e in epsilons
            ]
            curves[Path(run).name] = (epsilons, accuracies)
            print(f"{run}: " + ", ".join(f"eps {e:g}: {100 * a:.2f} %" for e, a in zip(epsilons, accuracies)))
        print(f"wrote {plot_robustness(curves, args.attack, out)}")
        return
    if len(args.runs) != 1:
        raise ConfigError(f"plot {args.kind} takes one run folder, got {len(args.runs)}")
    from .runs.task_view import adapted_task

    view = adapted_task(args.runs[0], args.episode)
    if args.kind == "features":
        from .viz.features import plot_features

        path = plot_features(view, out, layer=args.layer, channel=args.channel, samples=args.samples)
    else:
        from .viz.boundary import plot_boundary

        path = plot_boundary(view, out, classes=tuple(args.classes), samples=args.samples)
    print(f"wrote {path}")


def cmd_perturb(args: argparse.Namespace) -> None:
    from .evaluate import mean_ci
    from .runs.metaperturb import meta_train
    from .runs.transfer import transfer

    if args.action == "info":
        from .perturb.pretrained import phi_info

        print(json.dumps(phi_info(args.phi), indent=2))
        return
    config = _run_config(args, args.action)
    if args.action == "meta-train":
        out = args.run_folder = Path(args.out or f"runs/{config.preset or 'perturb-' + config.data.name}")
        trainer = meta_train(config, out, resume=args.resume, progress=not args.no_progress, deadline=args.deadline)
        if trainer.world.is_main and not trainer.finished:
            return _stopped(args, trainer.step, config.train.steps)
        if trainer.world.is_main:
            made = (
                f"{out / 'phi.json'} (use it with: metareg perturb transfer --phi {out})"
                if config.perturb.name == "metaperturb"
                else f"{out / 'checkpoint.json'}"
            )
            print(f"meta-trained {config.perturb.name} for {trainer.step} steps in {trainer.seconds:.0f} s; {made}")
        return
    out = args.run_folder = Path(args.out or f"runs/{config.preset or 'transfer-' + config.data.name}")
    record = transfer(config, out, resume=args.resume, progress=not args.no_progress, deadline=args.deadline)
    if record is None:
        from .runs.transfer import stopped_at

        folder, step = stopped_at(out)
        if folder != out:
            print(f"(in {folder})")
        return _stopped(args, step, config.train.steps)
    what = {"metaperturb": "MetaPerturb", "none": "no perturbation"}.get(config.perturb.name, config.perturb.name) + (
        " + fine-tuning" if config.init_from else ""
    )

    def line(label: str, r: dict, name: str) -> str:
        e = mean_ci(r["scores"])  # (a record read back is checked: metareg.runfolder.read_result)
        return (
            f"{label}: {100 * e.mean:.2f} +- {100 * e.ci95:.2f} % (mean +- 95% CI over {e.n} test images; "
            f"{config.model.backbone}, {name}, {r['protocol'].get('mc_samples', '?')} MC samples)"
            + (
                f"; NLL {r['nll']:.3f}, ECE {r['ece']:.3f}"
                if r.get("nll") is not None and r.get("ece") is not None
                else ""
            )
            + (
                f", final training accuracy {100 * r['final_train_accuracy']:.1f} %"
                if r.get("final_train_accuracy") is not None
                else ""
            )
        )

    print(line("test accuracy", record, what))
    print(f"written to {out / 'test.json'}")
    if "base" in record:
        from .runs.transfer import base_run

        d = record["difference"]
        verdict = (
            "no significant difference"
            if abs(d["mean"]) <= d["ci95"]
            else ("it helps" if d["mean"] > 0 else "it hurts")
        )
        print(line("Base (no perturbation)", record["base"], "no perturbation"))
        print(f"written to {base_run(out) / 'test.json'}")
        print(
            f"{what} - Base (paired over the same {d['n']} test images): {100 * d['mean']:+.2f} +- "
            f"{100 * d['ci95']:.2f} points -> "
            f"{verdict} here (`metareg compare {out} {base_run(out)}` gives the same)"
        )


def cmd_reproduce(args: argparse.Namespace) -> None:
    from .runs.reproduce import EXPERIMENTS, run_experiment

    if not args.experiment:
        for name, e in EXPERIMENTS.items():
            print(f"{name:<24} {e.source}: {len(e.runs)} runs")
        return
    if args.plan:
        from .runs.reproduce import plan

        print(plan(args.experiment, args.out or f"runs/{args.experiment}"))
        return
    path = run_experiment(
        args.experiment,
        args.out or f"runs/{args.experiment}",
        iterations=args.steps,
        episodes=args.episodes,
        jobs=args.jobs,
        progress=not args.no_progress,
        deadline=args.deadline,
    )
    print(path.read_text())
    print(f"written to {path}")


def cmd_bench(args: argparse.Namespace) -> None:
    from .runs.bench import run_bench

    run_bench(args)


COMMANDS = {
    "train": cmd_train,
    "test": cmd_test,
    "compare": cmd_compare,
    "presets": cmd_presets,
    "checkpoints": cmd_checkpoints,
    "download": cmd_download,
    "bench": cmd_bench,
    "reproduce": cmd_reproduce,
    "plot": cmd_plot,
    "perturb": cmd_perturb,
}


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = build_parser().parse_args(argv)
    budget = getattr(args, "time_budget", None)
    args.deadline = started + budget if budget else None  # the budget counts from the command's start
    if args.command in ("train", "test", "compare", "perturb"):
        from .runtime import keep_freed_memory

        keep_freed_memory()  # see metareg.runtime: about 1.2x on CPU meta-training
    command = f"{args.command} {args.action}" if args.command == "perturb" else args.command
    try:
        COMMANDS[args.command](args)
    except MetaregError as err:
        print(f"metareg {command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system refused: a full disk, a read-only or unwritable folder
        where = f" {err.filename}" if err.filename else ""
        print(
            f"metareg {command}: error: cannot access{where}: {err.strerror or err} (check the path, its permissions "
            "and free disk space; nothing already written was removed)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"\nmetareg {command}: interrupted; continue with: {how_to_continue(args)}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
