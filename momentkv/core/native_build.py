"""Building and loading momentkv's C++ sources (``momentkv/core/*.cpp``) on the machine that runs them.

A source is compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``)
into ``$MOMENTKV_CACHE_DIR/kernels`` (default ``~/.cache/momentkv/kernels``), under a name holding the hash of
the source, the compiler's version and target, the flags and whatever else the caller names (the CPU's
features, for a build tuned to them), and loaded from there afterwards. :class:`NativeFunction` is one exported
function of such a library, loaded once per process; where it cannot be built or loaded it warns once and
stands for ``None``, and the caller keeps its tensor path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from importlib import resources
from pathlib import Path

SWITCH = "MOMENTKV_NATIVE_SCORING"  # "0" turns every native CPU function off
_SETTING = os.environ.get(SWITCH, "1").strip().lower()


def enabled() -> bool:
    """Whether native CPU functions are wanted (``MOMENTKV_NATIVE_SCORING``, read at import; on unless ``0``)."""
    return _SETTING not in ("0", "false", "off", "no")


def compiler() -> list[str] | None:
    """The compiler command: ``$CXX`` (words split as a shell would, so ``ccache g++`` works), else the first
    of ``c++``, ``g++``, ``clang++`` on the path."""
    words = shlex.split(os.environ.get("CXX", ""))
    if words and shutil.which(words[0]):
        return [shutil.which(words[0]), *words[1:]]
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return [shutil.which(name)]
    return None


def cache_dir() -> Path:
    root = os.environ.get("MOMENTKV_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "momentkv"


def private_folder(path: Path) -> Path:
    """``path``, made if missing (owner only), refused unless this user owns it and no one else may write in it:
    a library loaded from a folder others can write to would run their code."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        raise RuntimeError(f"{path} is not a folder only this user can write to")
    return path


@functools.cache
def cpu_features() -> bytes:
    """The CPU's model and feature flags (Linux ``/proc/cpuinfo``), for the key of a build tuned to this CPU;
    empty where unknown. Read once per process (each native source's build is keyed by it)."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return b""
    wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(wanted)).encode()


def read_source(source_name: str) -> bytes:
    """The text of ``momentkv/core/<source_name>``."""
    return resources.files("momentkv.core").joinpath(source_name).read_bytes()


def serial(flags: tuple[str, ...]) -> tuple[str, ...]:
    """``flags`` without OpenMP threads (its ``simd`` pragmas kept): what a source built with ``-fopenmp`` is
    built with where the compiler has no OpenMP runtime; its parallel regions then run on one thread."""
    return tuple("-fopenmp-simd" if flag == "-fopenmp" else flag for flag in flags)


def build(source_name: str, flags: tuple[str, ...], command: list[str] | None, rebuild: bool = False,
          key_extra: bytes = b"", source: bytes | None = None) -> Path:
    """The shared library of ``momentkv/core/<source_name>`` (or of ``source``, that file's text as read before)
    built with ``command`` and ``flags``: the cached one, or a new build (``rebuild``: build again even if
    cached). Where ``flags`` ask for OpenMP and the compiler fails with them, it is built with :func:`serial`
    flags (warned once; later processes find that build and do not try OpenMP again)."""
    source = read_source(source_name) if source is None else source
    if command is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    about = [subprocess.run([*command, flag], capture_output=True, text=True, timeout=60).stdout
             for flag in ("--version", "-dumpmachine")]
    folder = private_folder(cache_dir() / "kernels")

    def target_of(with_flags: tuple[str, ...]) -> Path:
        key = b"\0".join([source, *(a.encode() for a in about), platform.machine().encode(),
                          " ".join(with_flags).encode(), key_extra])
        return folder / f"{Path(source_name).stem}-{hashlib.sha256(key).hexdigest()[:16]}.so"

    target = target_of(flags)
    if target.is_file() and not rebuild:
        return target
    one_thread = serial(flags)
    if one_thread != flags and target_of(one_thread).is_file() and not rebuild:
        return target_of(one_thread)  # this compiler refused OpenMP before
    with tempfile.TemporaryDirectory(dir=folder) as work:
        src = Path(work) / source_name
        src.write_bytes(source)
        built = Path(work) / target.name
        run = subprocess.run([*command, *flags, str(src), "-o", str(built)], capture_output=True, text=True,
                             timeout=300)
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
            if one_thread != flags:  # a compiler without OpenMP (Apple's clang, say): the same source, one thread
                warnings.warn(f"momentkv: {Path(command[0]).name} refused OpenMP ({last}); {source_name} is built "
                              "to run on one thread", RuntimeWarning, stacklevel=2)
                return build(source_name, one_thread, command, rebuild, key_extra, source)
            raise RuntimeError(f"{Path(command[0]).name} failed: {last}")
        os.replace(built, target)  # atomic: a concurrent build of the same source writes the same file
    return target


class NativeFunction:
    """The C function ``symbol`` (``int f(const int64_t*)``) of a library :func:`build` makes, loaded on the first
    :meth:`get`; ``None`` once it could not be, with one warning naming ``what`` and what happens instead.

    The source is read when this object is made (at import), not when the library is first built: the Python
    that fills the argument block and the C++ that reads it are then always of one version, even if the package
    on disk is replaced while a process runs.
    """

    def __init__(self, source_name: str, symbol: str, flags: tuple[str, ...], what: str, instead: str,
                 key_extra: bytes = b""):
        self.source_name, self.symbol, self.flags = source_name, symbol, flags
        self.what, self.instead, self.key_extra = what, instead, key_extra
        self._lock = threading.Lock()
        self._loaded: list = []  # [function] once loaded, [None] once given up
        self._failure: list[str] = []
        try:
            self.source = read_source(source_name)
        except OSError as error:  # a damaged installation: the first get() warns and returns None
            self.source, self._unreadable = None, f"{type(error).__name__}: {error}"
        else:
            self._unreadable = None

    def failure(self) -> str | None:
        """Why the library could not be built or loaded, or ``None``."""
        return self._failure[0] if self._failure else None

    def get(self, builder=None):
        """The loaded function, or ``None`` (warned once). ``builder(rebuild)`` makes the library's path
        (default: :func:`build` with this function's source and flags)."""
        if self._loaded:
            return self._loaded[0]
        make = builder or (lambda rebuild: build(self.source_name, self.flags, compiler(), rebuild, self.key_extra,
                                                 self.source))
        with self._lock:
            if not self._loaded:
                try:
                    if self._unreadable is not None:
                        raise RuntimeError(f"its source cannot be read ({self._unreadable})")
                    if ctypes.sizeof(ctypes.c_void_p) != 8:
                        raise RuntimeError("the argument block holds 64-bit addresses; this Python's are not")
                    try:
                        lib = ctypes.CDLL(str(make(False)))
                    except OSError:  # a damaged or foreign file under the expected name: built again, once
                        lib = ctypes.CDLL(str(make(True)))
                    fn = getattr(lib, self.symbol)
                    fn.argtypes = [ctypes.c_void_p]
                    fn.restype = ctypes.c_int
                    self._loaded.append(fn)
                except Exception as error:  # noqa: BLE001 - any build or load failure: the tensor path, said once
                    self._failure.append(f"{type(error).__name__}: {error}")
                    self._loaded.append(None)
                    warnings.warn(f"momentkv: {self.what} is unavailable ({self._failure[0]}); {self.instead}. Set "
                                  f"{SWITCH}=0 to skip the attempt.", RuntimeWarning, stacklevel=4)
        return self._loaded[0]
