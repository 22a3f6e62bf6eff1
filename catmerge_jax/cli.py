"""``catmerge`` — the command line. Argument parsing, progress and error reporting only; the work is in
:mod:`catmerge_jax.pipeline`.

::

    catmerge merge --method {cat,task_arithmetic,ties,average,...} --base DIR --task DIR [--task DIR ...]
                   [--exemplars FILE [--exemplars FILE ...]] [--alpha A] [--lam L] [--c C] [--quiet]
                   [--role PATTERN=ROLE ...] --out DIR
    catmerge merge --config RECIPE.yaml --out DIR [--overwrite] [--quiet]   # a MergeKit recipe (docs/mergekit.md)
    catmerge roles --base DIR [--role PATTERN=ROLE ...]

``--base``/``--task`` take folders or Hugging Face hub IDs found in the local hub cache. Data-free methods merge
folders of any architecture tensor by tensor, out of core (:mod:`catmerge_jax.folder_methods`; roles from
:mod:`catmerge_jax.torch_roles`); bert, roberta, clip and blip folders also take the exemplar methods.
    catmerge example [--out DIR] [--quiet]

``--method`` lists every registered method (:func:`catmerge_jax.methods.registry.available_methods`). Each
method keeps its own defaults (``MergeMethod.defaults``: alpha 0.3 for task arithmetic and CAT, lam 5, c 3; TIES
keeps the top 20% with alpha 1); ``--alpha`` is the merge scale (``MergeMethod.scale_name``; refused for a method
without one, such as RegMean, whose ``alpha`` is set with ``--hparam alpha=...``), ``--lam/--c`` reach the methods
that take them, ``--hparam NAME=VALUE`` sets any other (checked like the flags; ``stats``, ``roles``, ``progress``
and a method's computed inputs are reserved). Errors a user can fix print one line to stderr and exit with status
2; Ctrl-C exits 130 and SIGTERM 143, both after removing the run's temporary folder. What ``--out`` may be is
checked before any work (:func:`catmerge_jax.pipeline.prepare_output`).
"""

from __future__ import annotations

import _thread
import argparse
import ast
import contextlib
import math
import signal
import sys
import threading
import time
from typing import Any, Sequence

from catmerge_jax.errors import CatMergeError, HyperparameterError
from catmerge_jax.stagetimes import StageTimes

EXIT_USAGE = 2


# The method table is read on first use: importing it imports JAX and every method (about a second), which
# `catmerge --help`, `catmerge roles` and a mistyped command line do not need.
def _registry():
    import catmerge_jax.methods  # noqa: F401 — importing the package registers every method
    from catmerge_jax.methods import registry

    return registry


def available_methods() -> list[str]:
    return _registry().available_methods()


def get_method(name: str):
    return _registry().get_method(name)


def merge_scale_name(method) -> str | None:
    return _registry().merge_scale_name(method)


class _MethodNames:
    """``--method``'s argparse choices, read from the method table only when argparse needs them."""

    def __contains__(self, name: object) -> bool:
        return name in available_methods()

    def __iter__(self):
        return iter(available_methods())


def _hparam(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` with VALUE read as a Python literal when it is one (``0.2``, ``3``, ``True``), else a string."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        try:
            parsed = float(value)  # nan, inf: numbers, so they get the "must be finite" check
        except ValueError:
            parsed = value.strip()
    return name.strip(), parsed


def _role(text: str) -> tuple[str, str]:
    """``PATTERN=ROLE`` of ``--role`` (:func:`catmerge_jax.torch_roles.parse_role_override`)."""
    from catmerge_jax.torch_roles import RoleError, parse_role_override

    try:
        return parse_role_override(text)
    except RoleError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


RESERVED_HPARAMS = ("stats", "roles", "progress", "pretrained", "finetuned")
"""Keywords of ``MergeMethod.merge`` that catmerge sets itself; ``--hparam`` may not set them (nor a method's
``extras``, e.g. ``fishers``, which the pipeline computes)."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_value(flag: str, name: str, value: Any, default: Any = None) -> None:
    """The checks every hyperparameter gets, whether it came from ``--alpha`` or ``--hparam alpha=...``."""
    if name in ("alpha", "lam") or _is_number(default) or isinstance(value, float):
        if not _is_number(value):
            raise HyperparameterError(f"{flag} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise HyperparameterError(f"{flag} must be a finite number, got {value}")
    if name == "lam" and value < 0:
        raise HyperparameterError(f"{flag} must be >= 0, got {value}")
    if name == "c" or (type(default) is int and name not in ("alpha", "lam")):
        if type(value) is not int:
            raise HyperparameterError(f"{flag} must be an integer, got {value!r}")
    if name == "c" and value < 0:
        raise HyperparameterError(f"{flag} must be >= 0, got {value}")
    if isinstance(default, bool) and not isinstance(value, bool):
        raise HyperparameterError(f"{flag} must be True or False, got {value!r}")
    if isinstance(default, str) and not isinstance(value, str):
        raise HyperparameterError(f"{flag} must be a name, got {value!r}")


def check_hparams(method, given: dict[str, Any], extra: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Validate the flags and the ``--hparam`` pairs the same way; returns the ``--hparam`` settings as a dict.

    ``given`` maps flag names to values; ``--alpha`` sets the method's merge scale keyword."""
    keyword_of = {"alpha": merge_scale_name(method)}
    for name, value in given.items():
        if value is not None:
            _check_value(f"--{name}", name, value, method.defaults.get(keyword_of.get(name, name)))
    out: dict[str, Any] = {}
    for name, value in extra:
        flag = f"--hparam {name}"
        if name in RESERVED_HPARAMS or name in method.extras:
            raise HyperparameterError(f"{flag} is reserved: catmerge sets '{name}' itself")
        if not name.isidentifier():
            raise HyperparameterError(f"{flag}: '{name}' is not a hyperparameter name")
        if name in out:
            raise HyperparameterError(f"{flag} is given twice")
        repeated = [f for f, v in given.items() if v is not None and keyword_of.get(f, f) == name]
        if repeated:
            raise HyperparameterError(f"{flag} repeats --{repeated[0]}; give it once")
        _check_value(flag, name, value, method.defaults.get(name))
        out[name] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="catmerge", description="Training-free model merging (CAT Merging and "
                                     "baselines) of Hugging Face checkpoints, in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{merge,roles,example}")

    merge = sub.add_parser("merge", help="merge fine-tuned task folders into one model folder")
    # metavar: argparse lists the choices only when it prints them (the help below), so the table loads then
    merge.add_argument("--method", choices=_MethodNames(), metavar="METHOD",
                       help="registered merging method (required without --config): %(choices)s")
    merge.add_argument("--base", metavar="DIR", help="pretrained Hugging Face model folder (required without --config)")
    merge.add_argument("--task", action="extend", nargs="+", metavar="DIR",
                       help="fine-tuned model folder (repeat once per task; required without --config)")
    merge.add_argument("--config", metavar="RECIPE.yaml", help="a MergeKit recipe (merge_method, base_model, models, "
                       "parameters, dtype, ...; see docs/mergekit.md) instead of --method/--base/--task")
    merge.add_argument("--exemplars", action="extend", nargs="+", metavar="FILE", default=None,
                       help="one exemplar file per task, in --task order: UTF-8 text with one example per line "
                            "(text models) or a float32 .npy (N, H, W, 3) of preprocessed pixels (vision models), "
                            'or JSON Lines of {"image": PATH, "text": TEXT} (BLIP; paths relative to the file)')
    merge.add_argument("--alpha", type=float, help="merge scale: W0 + alpha * merged task vector (method default if "
                       "omitted; refused for a method without one, e.g. regmean: use --hparam alpha=...)")
    merge.add_argument("--lam", type=float, help="CAT trade-off lambda >= 0 (default 5)")
    merge.add_argument("--c", type=int, help="CAT basis / mask size (default 3)")
    merge.add_argument("--hparam", action="append", type=_hparam, default=[], metavar="NAME=VALUE",
                       help="any other keyword of the method (e.g. k=0.1 for ties, joint=True for cat)")
    merge.add_argument("--feature-scale", type=float, default=1.0, metavar="S",
                       help="capture features with W0 + S*T_k (1 = the paper's task-k model)")
    merge.add_argument("--batch-size", type=int, default=16, help="exemplars per forward pass")
    merge.add_argument("--role", action="append", type=_role, default=[], metavar="PATTERN=ROLE",
                       help="role of the tensors matching PATTERN (fnmatch; as `catmerge roles` names them): linear, "
                            "linear_in_out, scale, shift or other")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    merge.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    merge.add_argument("--out", required=True, metavar="DIR", help="output model folder")

    roles = sub.add_parser("roles", help="print the CAT role of every parameter of a model folder")
    roles.add_argument("--base", required=True, metavar="DIR", help="Hugging Face model folder or cached hub ID")
    roles.add_argument("--role", action="append", type=_role, default=[], metavar="PATTERN=ROLE",
                       help="override the role of the tensors matching PATTERN (as for merge)")

    example = sub.add_parser("example", help="run the built-in offline example (all-MiniLM-L6-v2, 5 small tasks)")
    example.add_argument("--out", default=None, metavar="DIR", help="keep the example's folders here")
    example.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


COMPILING_COMMANDS = ("merge", "example")
"""Commands that run JAX programs, so turn on the persistent compilation cache."""


LAPACK_THREADS = ("OPENBLAS_NUM_THREADS",)
"""OpenBLAS's thread count, read once when NumPy/SciPy load it (JAX's CPU LAPACK calls, eigh and SVD, go through
SciPy's OpenBLAS)."""


def single_threaded_lapack(environ=None) -> None:
    """One OpenBLAS thread for the command's LAPACK calls, unless the user chose a count.

    The merge's LAPACK problems are small (``n × n`` eighs and SVDs, n = a layer's width) and run between XLA
    programs whose own thread pool has the cores: OpenBLAS's threads spin-wait for work and fight it, which on
    a busy 2-core machine made TSV on MiniLM's layers 10× slower (and CAT's eighs 20×: 1.7 s for three
    384 × 384 eighs against 0.09 s with one thread). Effective only before NumPy is imported (``main`` runs it
    first); ``OPENBLAS_NUM_THREADS`` set by the user wins. In a process that already loaded NumPy (``main`` called
    from Python) it would change nothing but the environment of later subprocesses, so it leaves that alone.

    >>> env = {"OPENBLAS_NUM_THREADS": "2"}
    >>> single_threaded_lapack(env), single_threaded_lapack(other := {}), env, other
    (None, None, {'OPENBLAS_NUM_THREADS': '2'}, {'OPENBLAS_NUM_THREADS': '1'})
    """
    import os

    if environ is None:
        if "numpy" in sys.modules:
            return
        environ = os.environ
    for name in LAPACK_THREADS:
        environ.setdefault(name, "1")


def run_recipe(args: argparse.Namespace) -> int:
    """``catmerge merge --config RECIPE.yaml --out DIR``: a MergeKit recipe (:mod:`catmerge_jax.recipes`)."""
    from catmerge_jax import recipes

    given = [flag for flag, value in (("--method", args.method), ("--base", args.base), ("--task", args.task),
                                      ("--exemplars", args.exemplars), ("--alpha", args.alpha), ("--lam", args.lam),
                                      ("--c", args.c), ("--hparam", args.hparam), ("--role", args.role)) if value]
    if given:
        raise recipes.RecipeError(f"--config takes the method, models and parameters from the recipe; drop "
                                  f"{', '.join(given)}")
    recipe = recipes.load_recipe(args.config)
    out = recipes.run_recipe(recipe, args.out, overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet:
        print(f"merged {len(recipe.inputs)} model(s) with MergeKit's {recipe.method} ({args.config}) -> {out}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from catmerge_jax import pipeline

    if args.config is not None:
        return run_recipe(args)
    missing = [flag for flag, value in (("--method", args.method), ("--base", args.base), ("--task", args.task))
               if not value]
    if missing:
        raise pipeline.InputError(f"the following arguments are required: {', '.join(missing)} (or --config "
                                  "RECIPE.yaml)")
    method = get_method(args.method)
    given = {"alpha": args.alpha, "lam": args.lam, "c": args.c}
    # Cheap checks before any checkpoint is read (the method validates again); --alpha on a method without a
    # merge scale is refused here.
    hparams, ignored = pipeline.resolve_hparams(method, given)
    extra = check_hparams(method, given, args.hparam)
    if args.batch_size < 1:
        raise HyperparameterError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not math.isfinite(args.feature_scale):
        raise HyperparameterError(f"--feature-scale must be a finite number, got {args.feature_scale}")
    # Any other keyword of the method (e.g. cat's joint=True); the method rejects names it does not take.
    hparams.update(extra)
    if ignored and not args.quiet:
        print(f"note: method '{method.name}' takes no {', '.join('--' + n for n in ignored)}; ignored",
              file=sys.stderr)
    stages = StageTimes()
    out = pipeline.merge_folders(method.name, args.base, args.task, args.exemplars, args.out, hparams=hparams,
                                 feature_scale=args.feature_scale, batch_size=args.batch_size,
                                 roles=dict(args.role) or None, overwrite=args.overwrite, progress=not args.quiet,
                                 stages=stages)
    if not args.quiet:
        settings = {**method.defaults, **hparams}
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        print(f"merged {len(args.task)} task(s) with {method.name} ({shown}) -> {out}")
        if "load" in stages.seconds:  # the in-memory path timed its stages (streamed merges have their own bars)
            print(stages.line())
    return 0


def run_roles(args: argparse.Namespace) -> int:
    from catmerge_jax.folder_methods import folder_role_table

    print(folder_role_table(args.base, dict(args.role) or None))
    return 0


def run_example(args: argparse.Namespace) -> int:
    from catmerge_jax import example

    example.run_example(out_dir=args.out, progress=not args.quiet)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like SIGINT's KeyboardInterrupt, so the same clean-up runs
    (temporary folders removed) before the process exits with ``128 + SIGTERM``."""


def _on_sigterm(signum, frame):
    raise Terminated(signum)


def _redeliver_interrupts(hook):
    """A ``sys.unraisablehook`` that re-sends a SIGTERM/SIGINT whose exception was swallowed.

    Python runs signal handlers between bytecodes, also inside gc callbacks (jax installs one), where an exception
    is only reported as "ignored": the signal would be lost and the merge would run on and publish its result.
    Sending it again to the main thread (if that lands in a callback again, it comes back here) raises it in
    ordinary code.
    """

    def resend(signum):
        time.sleep(0.01)  # from another thread, a little later: the main thread has left the callback by then
        _thread.interrupt_main(signum)

    def handle(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):  # Terminated is one too
            signum = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
            threading.Thread(target=resend, args=(signum,), daemon=True).start()
            return
        hook(unraisable)

    return handle


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    previous_hook, sys.unraisablehook = sys.unraisablehook, _redeliver_interrupts(sys.unraisablehook)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (``catmerge = "catmerge_jax.cli:main"``). Returns the exit status: 0, 2 for an error the
    user can fix (one line on stderr), 130 after SIGINT (Ctrl-C), 143 after SIGTERM."""
    args = build_parser().parse_args(argv)
    handlers = {"merge": run_merge, "roles": run_roles, "example": run_example}
    if args.command in COMPILING_COMMANDS:
        single_threaded_lapack()
        # Programs compiled once per machine (JAX's persistent cache in the user's cache folder;
        # CATMERGE_COMPILATION_CACHE=0 turns it off): docs/performance.md.
        from catmerge_jax.compilation_cache import enable_compilation_cache, shapes_cache_dir
        from converters.keys import remember_template_shapes

        if enable_compilation_cache() is not None:
            remember_template_shapes(shapes_cache_dir())  # and the models' parameter shapes (no init traced)
    try:
        with _sigterm_as_interrupt():
            return handlers[args.command](args)
    except CatMergeError as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"catmerge: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except Terminated:
        print("catmerge: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("catmerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
