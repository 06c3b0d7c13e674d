"""``momentkv lm-eval ARGS...``: lm-evaluation-harness's own command line, with the ``momentkv`` model registered.

lm-eval finds models only in its own registry, so this command imports momentkv's model class (which
registers ``momentkv``) and then runs lm-eval's command line with ``ARGS`` unchanged. Three additions, all
ahead of any work: momentkv's model arguments (``policy``, ``budget``, ``import``) are resolved first, so a
bad one, or a misspelt argument ("did you mean budget?"), ends the run with its ``PolicyError`` message and
exit code 2; ``--output_path`` is checked (a folder, or a ``.json`` file, that can be written: lm-eval only
finds out after the evaluation); and the folder of the shipped ``momentkv_long`` tasks joins the task
folders named by ``--include_path`` (or a ``--config`` file).
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2
INSTALL = 'pip install "momentkv[lm-eval]"'


def register(subparsers) -> None:
    # Every argument belongs to lm-eval, help included: a prefix no argument uses keeps argparse from
    # taking ``--model`` or ``--help`` as this parser's own options.
    p = subparsers.add_parser(
        "lm-eval", add_help=False, prefix_chars="\x00",
        help="run lm-evaluation-harness with the momentkv model registered (arguments as for lm-eval)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"momentkv lm-eval: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _parse(harness, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` exactly as the ``lm-eval`` command does (it reads ``sys.argv``, inserting ``run``)."""
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        return harness.parse_args()
    finally:
        sys.argv = saved


def _with_shipped_tasks(parsed: argparse.Namespace, tasks_dir: str) -> None:
    """Add ``tasks_dir`` to the task folders the command names (lm-eval's TaskManager takes a list)."""
    if not hasattr(parsed, "include_path"):
        return
    given = parsed.include_path
    if given is None and getattr(parsed, "config", None):
        from lm_eval.config.evaluate_config import EvaluatorConfig

        # A command-line value replaces the config file's, so carry the file's folders over.
        given = EvaluatorConfig.load_yaml_config(parsed.config).get("include_path")
    paths = [] if given is None else [str(p) for p in (given if isinstance(given, (list, tuple)) else [given])]
    parsed.include_path = paths + ([tasks_dir] if tasks_dir not in paths else [])


def _check_output_path(path) -> str | None:
    """What is wrong with lm-eval's ``--output_path`` (None: nothing). lm-eval writes a ``.json`` path's
    results beside it, and any other path's into a folder under it, adding timestamped files and deleting
    none, so a folder that already holds files is fine."""
    from momentkv.cli.outputs import LM_EVAL, OutputPathError, check_output_file, check_output_folder

    if not path:
        return None
    try:
        if str(path).endswith(".json"):
            check_output_file(path, "--output_path")
        else:
            check_output_folder(path, LM_EVAL, option="--output_path")
    except OutputPathError as err:
        return str(err)
    return None


def run(args) -> int:
    try:
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging
    except ImportError:
        return _fail(f"lm-evaluation-harness is not installed; install it with: {INSTALL}")
    from momentkv.errors import PolicyError
    from momentkv.integrations import lm_eval_model
    from momentkv.integrations.lm_eval_args import pop_args
    from momentkv.integrations.tasks import TASKS_DIR

    setup_logging()
    harness = HarnessCLI()
    parsed = _parse(harness, list(args.lm_eval_args))
    try:
        if getattr(parsed, "model", None) == lm_eval_model.MODEL_NAME:
            # Checked here; the model resolves them again.
            pop_args(dict(getattr(parsed, "model_args", None) or {}), lm_eval_model.HF_ARGS)
        problem = _check_output_path(getattr(parsed, "output_path", None))
        if problem:
            return _fail(problem)
        _with_shipped_tasks(parsed, str(TASKS_DIR))
        harness.execute(parsed)
    except PolicyError as err:
        return _fail(str(err))
    return 0
