"""The ``momentkv_long`` lm-evaluation-harness tasks: long, exactly checkable answers, offline.

``TASKS_DIR`` is the folder to give lm-eval as ``--include_path`` (``momentkv lm-eval`` does so itself).
``local_json`` loads a task's documents (each YAML's ``custom_dataset``); ``metrics.py`` scores the answers.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
GROUP = "momentkv_long"
TASK_NAMES = ("momentkv_count", "momentkv_recall", "momentkv_tally")


def local_json(data_files: dict | str, **_metadata):
    """The task's JSONL files as a ``DatasetDict``, read with the ``json`` builder of ``datasets``.

    Relative paths in ``data_files`` are taken from this folder (where the files ship), not from the
    current directory, so the tasks run from anywhere; lm-eval passes its run metadata (model arguments,
    task version) as keywords too, which play no part here.
    """
    import datasets

    files = {"test": data_files} if isinstance(data_files, str) else dict(data_files)
    resolved = {split: str(TASKS_DIR / path) for split, path in files.items()}
    return datasets.load_dataset("json", data_files=resolved)
