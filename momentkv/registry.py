"""One registry for the components of the policy language: scorers and prefill compressors.

A component is a frozen, strict pydantic model written ``{type: name, ...}`` in a policy. Each kind has one
:class:`ComponentRegistry`, and every kind follows the same rules:

- ``register(name)`` is a class decorator. ``name`` must be an identifier; the class must subclass the
  kind's base class and keep its strict validation (``extra="forbid"``, ``frozen=True``, ``strict=True``:
  in a policy file ``"128"`` is text and ``true`` is not ``1``). It returns a subclass whose ``type`` is
  fixed to ``name``, so ``MyScorer(alpha=0.5)`` in Python and ``{type: name, alpha: 0.5}`` in YAML build
  equal objects. A second class under a taken name is refused; registering the same class again (the same
  module and qualified name, as when a module is reloaded) replaces it.
- The class must keep its kind's contract, checked at registration rather than midway through a
  ``generate()``: it implements the methods the kind requires (``update`` for a scorer; ``select`` for a
  prefill compressor that keeps fewer than all prompt tokens), every method of the base class it overrides can
  still be called as the base's is (``update(self, ctx)``), and every class attribute of the base's contract
  keeps its type (``needs_attention`` a bool, ``state_channels`` an int). A class that breaks it is refused with
  a :class:`~momentkv.errors.PolicyError` naming each broken part.
- Installed packages add components without an import by the user through an entry-point group
  (``momentkv.scorers``, ``momentkv.prefill``): ``name = "package.module:Class"``, whose import runs the
  decorator. The group is read once, the first time a name is missing or the names are listed.
- A plugin that cannot be loaded (its module fails to import, or registers no component under its entry
  point's name) never breaks anything else: a :class:`PluginWarning` names the package and the entry point
  once, the registry remembers why, and a policy that names that component gets a ``PolicyError`` giving the
  same reason every time (see :meth:`ComponentRegistry.failure`).
"""

from __future__ import annotations

import inspect
import warnings
from importlib.metadata import entry_points
from typing import Callable, Iterable, Literal, TypeVar

from pydantic import BaseModel, create_model

from momentkv.errors import PolicyError

T = TypeVar("T", bound=type)

#: The settings every component keeps (see the module docstring).
STRICT_CONFIG = {"extra": "forbid", "frozen": True, "strict": True}


def _hooks(base: type) -> dict[str, Callable]:
    """The public methods of ``base`` and of its ancestors below pydantic's ``BaseModel``: the contract."""
    hooks: dict[str, Callable] = {}
    for klass in reversed([k for k in base.__mro__ if issubclass(k, BaseModel) and k is not BaseModel]):
        hooks.update((name, value) for name, value in vars(klass).items()
                     if inspect.isfunction(value) and not name.startswith("_"))
    return hooks


def _positional(function: Callable) -> list[str]:
    return [p.name for p in inspect.signature(function).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _callable_as(cls: type, name: str, base_function: Callable) -> str | None:
    """Why ``cls.name`` cannot be called as ``base_function`` is (``None``: it can)."""
    wanted = f"{name}({', '.join(_positional(base_function))})"
    static = inspect.getattr_static(cls, name)
    if isinstance(static, staticmethod):
        function, bound = static.__func__, 0
    elif isinstance(static, classmethod):
        function, bound = static.__func__, 1
    elif inspect.isfunction(static):
        function, bound = static, 1
    else:
        return f"has {name} = {static!r}, not a method {wanted}"
    arguments = [None] * (len(_positional(base_function)) - 1)  # what the engine passes after self
    try:
        inspect.signature(function).bind(*[None] * bound, *arguments)
    except TypeError:
        own = f"{name}{inspect.signature(function)}"
        return f"has {own}, which cannot be called as {wanted}"
    return None


def contract_problems(cls: type, base: type[BaseModel], required: Iterable[str]) -> list[str]:
    """How component class ``cls`` breaks ``base``'s contract (empty: it keeps it): a ``required`` method
    it does not implement, an overridden method that cannot be called as the base's, a class attribute of the
    base's contract (a pydantic ``ClassVar``) of another type."""
    hooks = _hooks(base)
    problems = []
    for name in required:
        if getattr(cls, name, None) is hooks[name]:
            problems.append(f"does not implement {name}({', '.join(_positional(hooks[name]))}), which the "
                            f"{base.__qualname__} contract requires")
    for name, function in hooks.items():
        if getattr(cls, name, None) is not function:
            why = _callable_as(cls, name, function)
            if why is not None:
                problems.append(why)
    for name in sorted(getattr(base, "__class_vars__", ())):
        want, got = getattr(base, name), getattr(cls, name)
        if type(got) is not type(want):
            problems.append(f"has {name} = {got!r}, not {'an' if type(want).__name__[0] in 'aeiou' else 'a'} "
                            f"{type(want).__name__} as {base.__qualname__}.{name}")
    return problems


class PluginWarning(UserWarning):
    """An installed package declares a momentkv component that cannot be loaded."""


def _describe_entry(entry, group: str) -> str:
    """``entry point 'peak = pkg.mod:Peak' (group momentkv.scorers) of package pkg 1.0``."""
    dist = getattr(entry, "dist", None)
    package = f"{dist.name} {dist.version}" if dist is not None else "an unknown package"
    return f"entry point '{entry.name} = {entry.value}' (group {group}) of package {package}"


_REGISTRIES: list["ComponentRegistry"] = []


def registry_for(cls: type) -> "ComponentRegistry | None":
    """The registry whose components subclass ``cls``'s kind (``None`` for a class that is no component)."""
    for registry in _REGISTRIES:
        if isinstance(cls, type) and issubclass(cls, registry.base):
            return registry
    return None


class ComponentRegistry:
    """The components of one kind, by name.

    Args:
        base: the class every component of this kind subclasses (``Scorer``, ``PrefillCompressor``).
        kind: the kind's name in messages (``scorer``, ``prefill compressor``).
        group: the entry-point group that installed packages declare components in.
        required: the methods of ``base`` that a component class must implement itself, given the class
            (``lambda cls: ("update",)``); the base's own raise ``NotImplementedError``.
    """

    def __init__(self, base: type[BaseModel], kind: str, group: str,
                 required: Callable[[type], Iterable[str]] = lambda cls: ()):
        self.base, self.kind, self.group, self.required = base, kind, group, required
        self._classes: dict[str, type[BaseModel]] = {}
        self._failures: dict[str, str] = {}  # entry-point name -> why it could not be loaded
        self._scanned = False
        self._scanning = False
        _REGISTRIES.append(self)

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: make ``cls`` available to policies as ``type: name`` (see the module docstring)."""
        if not (isinstance(name, str) and name.isidentifier()):
            raise ValueError(f"a {self.kind} name must be an identifier, got {name!r}")

        def decorate(cls):
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"registering {self.kind} {name!r} needs a subclass of {self.base.__qualname__}, "
                                f"got {cls!r}")
            loose = {key: cls.model_config.get(key) for key, want in STRICT_CONFIG.items()
                     if cls.model_config.get(key) != want}
            if loose:
                settings = ", ".join(f"{key}={value!r}" for key, value in loose.items())
                raise TypeError(f"{self.kind} {cls.__qualname__} relaxes validation ({settings}): components keep "
                                "extra='forbid', frozen=True and strict=True, so a policy file means what it says")
            taken = self._classes.get(name)
            if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(f"a {self.kind} named {name!r} is already registered "
                                 f"({taken.__module__}.{taken.__qualname__})")
            broken = contract_problems(cls, self.base, self.required(cls))
            if broken:
                raise PolicyError([f"{self.kind} {cls.__name__} (registered as {name!r}) {problem}"
                                   for problem in broken])
            registered = create_model(
                cls.__name__, __base__=cls, __module__=cls.__module__, __doc__=cls.__doc__,
                type=(Literal[name], name),
            )
            registered.__qualname__ = cls.__qualname__
            self._classes[name] = registered
            self._failures.pop(name, None)
            return registered

        return decorate

    def get(self, name: str) -> type[BaseModel]:
        """The class registered as ``name``; ``KeyError`` if none is (see :meth:`failure` for why)."""
        if name not in self._classes:
            self._scan()
        return self._classes[name]

    def names(self) -> list[str]:
        """Every registered name, sorted (installed plugins included)."""
        self._scan()
        return sorted(self._classes)

    def resolve(self, data) -> type[BaseModel] | None:
        """The class that validates ``data`` (a mapping with a registered ``type``, or a name); ``None`` if none."""
        name = data.get("type") if isinstance(data, dict) else data
        if not isinstance(name, str):
            return None
        try:
            return self.get(name)
        except KeyError:
            return None

    def failure(self, name: str) -> str | None:
        """Why the plugin that declares ``name`` could not be loaded; ``None`` if no plugin failed for it."""
        self._scan()
        return self._failures.get(name)

    def _scan(self) -> None:
        """Load the entry points of the group once. A failing plugin is recorded and warned about, never raised:
        the names of the other plugins and the built-ins stay usable."""
        if self._scanned or self._scanning:  # _scanning: a plugin's import may itself look names up
            return
        self._scanning = True
        try:
            for entry in entry_points(group=self.group):
                if entry.name in self._classes or entry.name in self._failures:
                    continue
                try:
                    entry.load()  # the module's decorator registers the component
                except Exception as err:  # noqa: BLE001  (any failure of a third-party import is reported, not raised)
                    self._fail(entry, f"failed to load ({type(err).__name__}: {err})")
                    continue
                if entry.name not in self._classes:
                    self._fail(entry, f"loaded, but registers no {self.kind} named {entry.name!r} (its class must be "
                                      f"decorated with the {self.kind} register function under that name)")
            self._scanned = True
        finally:
            self._scanning = False

    def _fail(self, entry, why: str) -> None:
        reason = f"the {_describe_entry(entry, self.group)} {why}"
        self._failures[entry.name] = reason
        warnings.warn(f"momentkv: {reason}; policies naming the {self.kind} {entry.name!r} are refused, all others "
                      "work", PluginWarning, stacklevel=4)
