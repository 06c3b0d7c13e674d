import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

from hypothesis import settings  # noqa: E402

# CI runs the same examples every time (a gate must not flip on a new random draw); locally each run
# explores new ones. HYPOTHESIS_PROFILE=explore in CI turns exploration back on.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "explore"))
