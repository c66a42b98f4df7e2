"""Loading a user's agent set from ``package.module:attribute``.

``netra serve --agents mymodule:agents`` (or ``NETRA_AGENTS``) names where
the agents live. The attribute may be

- an :class:`~netra.agents.AgentSet`;
- a list or tuple of :class:`~netra.agents.Agent` (the first is the default);
- a zero-argument callable returning either of those (for sets built from
  settings, or too costly to build at import time).

Every way this can go wrong is a :class:`ValueError` (the spec or the value
is wrong) or an :class:`ImportError` (the module or attribute cannot be
had), with a message written for the person who typed the command:
``netra serve`` prints it as ``netra serve: ...`` and exits 2 instead of
showing a traceback. That includes exceptions raised while the module is
imported, since the most common one is a ``@tool`` with an annotation the
schema deriver does not support, which fails at import time on purpose.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from .agents import Agent, AgentSet
from .tools import Tool

_SHAPES = "an AgentSet, a list of Agent, or a zero-argument function returning one"


def load_agents(spec: str) -> AgentSet:
    """The agent set that ``spec`` (``package.module:attribute``) names."""
    module_name, attribute = _split(spec)
    module = _import(module_name, spec)
    value = _attribute(module, attribute, spec)
    if callable(value) and not isinstance(value, (AgentSet, list, tuple)):
        value = _call(value, attribute, spec)
    agents = _as_set(value, spec)
    _check_tools(agents, spec)
    return agents


def _split(spec: str) -> tuple[str, str]:
    module_name, sep, attribute = (spec or "").strip().partition(":")
    parts = [*module_name.split("."), *attribute.split(".")]
    if not sep or not all(part.isidentifier() for part in parts):
        raise ValueError(f"agents must be given as package.module:attribute, got {spec!r}")
    return module_name, attribute


def _import(module_name: str, spec: str) -> Any:
    """Import the module, looking in the current directory too.

    ``python -m`` puts the current directory on ``sys.path`` but a console
    script like ``netra`` does not, so ``netra serve --agents mymodule:agents``
    run next to ``mymodule.py`` would not find it. The directory is added
    only when the top-level package is not found otherwise, so an installed
    package is never shadowed by a stray file.
    """
    top = module_name.partition(".")[0]
    for attempt in range(2):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            ours = missing == module_name or module_name.startswith(missing + ".")
            if not ours:  # the module exists but imports something that does not
                raise ImportError(f"{spec}: importing {module_name!r} failed: {exc}") from exc
            cwd = os.getcwd()
            if attempt == 0 and missing == top and cwd not in sys.path and "" not in sys.path:
                sys.path.insert(0, cwd)
                importlib.invalidate_caches()
                continue
            raise ImportError(
                f"{spec}: no module named {missing!r} (looked in the current directory and on "
                "sys.path; set PYTHONPATH or install the package)"
            ) from exc
        except ImportError as exc:
            raise ImportError(f"{spec}: importing {module_name!r} failed: {exc}") from exc
        except Exception as exc:  # the user's module raised while being imported
            raise ImportError(f"{spec}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    raise AssertionError("unreachable")


def _attribute(module: Any, attribute: str, spec: str) -> Any:
    value = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            where = getattr(module, "__file__", None) or module.__name__
            raise ImportError(f"{spec}: {module.__name__} ({where}) has no attribute {attribute!r}") from None
    return value


def _call(factory: Any, attribute: str, spec: str) -> Any:
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise ValueError(f"{spec}: {attribute} must take no arguments to be called for the agents") from None
    except ValueError:
        pass  # no signature to inspect (some builtins): just call it
    try:
        return factory()
    except Exception as exc:
        raise ValueError(f"{spec}: calling {attribute}() failed: {type(exc).__name__}: {exc}") from exc


def _as_set(value: Any, spec: str) -> AgentSet:
    if isinstance(value, AgentSet):
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{spec}: the list of agents is empty")
        for i, item in enumerate(value):
            if not isinstance(item, Agent):
                raise ValueError(f"{spec}: item {i} of the list is {_kind(item)}, not an Agent")
        try:
            return AgentSet.of(value)
        except ValueError as exc:
            raise ValueError(f"{spec}: {exc}") from None
    hint = "; wrap it in a list" if isinstance(value, Agent) else ""
    raise ValueError(f"{spec}: expected {_SHAPES}, got {_kind(value)}{hint}")


def _check_tools(agents: AgentSet, spec: str) -> None:
    """Catch tool entries that would otherwise fail later, deep in start-up,
    with an AttributeError: a plain function not made a Tool, a string given
    where a tuple of names was meant."""
    for agent in agents:
        if isinstance(agent.tools, str):
            raise ValueError(f"{spec}: agent {agent.name!r}: tools must be a tuple of names, got the string {agent.tools!r}")
        for entry in agent.tools:
            if not isinstance(entry, (str, Tool)):
                hint = " (decorate it with @tool)" if callable(entry) else ""
                raise ValueError(f"{spec}: agent {agent.name!r} lists {_kind(entry)} as a tool{hint}")
    try:
        agents.inline_tools()
    except ValueError as exc:
        raise ValueError(f"{spec}: {exc}") from None


def _kind(value: Any) -> str:
    """How a wrong value is named in a message: ``function make``, ``a dict``."""
    name = getattr(value, "__qualname__", None)
    if callable(value) and name:
        return f"{type(value).__name__} {name}"
    kind = type(value).__name__
    return f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind}"
