"""The ``momentkv_long`` lm-evaluation-harness tasks: long, exactly checkable answers, offline.

``TASKS_DIR`` is the folder to give lm-eval as ``--include_path`` (``momentkv lm-eval`` does so itself).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
GROUP = "momentkv_long"
TASK_NAMES = ("momentkv_count", "momentkv_recall", "momentkv_tally")
