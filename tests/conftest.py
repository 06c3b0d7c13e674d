import atexit
import os
import shutil
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Inductor's on-disk cache is not keyed by ATEN_CPU_CAPABILITY: a kernel cached by a run at AVX-512 is reused by
# a run at `default` (which then fails to compile it: no at::vec) or at AVX2 (which crashes in it). Every
# session compiles into its own folder, so a run at one capability never meets another's kernels.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE = tempfile.mkdtemp(prefix="momentkv-tests-inductor-")
atexit.register(shutil.rmtree, _INDUCTOR_CACHE, ignore_errors=True)
# The native scoring step builds into a session folder too, not into the user's ~/.cache.
os.environ["MOMENTKV_CACHE_DIR"] = _NATIVE_CACHE = tempfile.mkdtemp(prefix="momentkv-tests-native-")
atexit.register(shutil.rmtree, _NATIVE_CACHE, ignore_errors=True)
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

from hypothesis import HealthCheck, settings  # noqa: E402

# CI runs the same examples every time (a gate must not flip on a new random draw); locally each run
# explores new ones. HYPOTHESIS_PROFILE=explore in CI turns exploration back on. HYPOTHESIS_PROFILE=fuzz
# (`make fuzz`) runs only the property tests, with fresh examples and FUZZ_SCALE (default 3) times as many
# as each test asks for.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.register_profile("fuzz", deadline=None, print_blob=True, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "explore")
settings.load_profile(PROFILE)


def pytest_collection_modifyitems(config, items):
    if PROFILE != "fuzz":
        return
    scale = int(os.environ.get("FUZZ_SCALE", "3"))
    kept, dropped, scaled = [], [], set()
    for item in items:
        test = getattr(item, "obj", None)
        if not getattr(test, "is_hypothesis_test", False):
            dropped.append(item)
            continue
        kept.append(item)
        if id(test) in scaled:  # one function behind several parametrised items
            continue
        scaled.add(id(test))
        # A test's own @settings(max_examples=n) outranks any profile, so the fuzz run scales the settings
        # Hypothesis keeps on the test (an attribute of its wrapper: fail loudly if a release renames it).
        own = getattr(test, "_hypothesis_internal_use_settings", None)
        if own is None:
            raise pytest.UsageError("HYPOTHESIS_PROFILE=fuzz cannot scale this Hypothesis release's examples")
        test._hypothesis_internal_use_settings = settings(own, max_examples=own.max_examples * scale)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept
