"""Spec strings: the one place where names, modules and files become problems, operators and generators.

A spec is one of

- a registered name (``linear_gaussian``, ``elliptic``, ``phase_retrieval``), looked up in the entry-point
  group ``ganflow.problems``;
- ``package.module:attr`` (``attr`` may be dotted);
- ``path/to/file.py:attr``.

``attr`` is an object or a zero-argument factory (a class or function); keyword arguments from a config
table are passed to the factory. Code is imported only from specs the user gave explicitly: a spec read back
from a file (obs.h5, posterior.h5, ...) goes through `check_spec_from_file` first (the trust rule).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import warnings
from importlib.metadata import entry_points
from typing import Any, Callable

from .errors import GanflowError
from .operators import check_generator, check_operator, check_problem

__all__ = [
    "resolve_spec",
    "registered_problems",
    "load_problem",
    "load_operator",
    "operator_settings",
    "load_generator_spec",
    "instantiate",
    "normalize_spec",
    "check_spec_from_file",
    "UntrustedSpecError",
    "BUILTIN_PACKAGES",
]

PROBLEM_GROUP = "ganflow.problems"

# Built-ins, used when the package metadata (entry points) is not installed, e.g. running from a source tree.
_BUILTIN_PROBLEMS = {
    "linear_gaussian": "ganflow.problems.linear_gaussian:LinearGaussianProblem",
    "elliptic": "ganflow.problems.elliptic:EllipticProblem",
    "phase_retrieval": "ganflow.problems.phase_retrieval:PhaseRetrievalProblem",
}


# --- Deprecated alias, kept for one release: the built-in problems used to install as a top-level package
# `problems`; they now live in ganflow.problems, and the old spelling maps there with a warning.
_LEGACY_PROBLEM_MODULES = ("problems", "problems.linear_gaussian", "problems.elliptic", "problems.phase_retrieval")


def _legacy_problems_alias(module_part: str) -> str:
    """``problems.X`` (the old spelling of a built-in module) -> ``ganflow.problems.X``, with a DeprecationWarning
    pointing at the first caller outside ganflow; any other module name is returned unchanged."""
    if module_part not in _LEGACY_PROBLEM_MODULES:
        return module_part
    root, frame, level = os.path.dirname(os.path.abspath(__file__)), sys._getframe(), 1
    while frame is not None and frame.f_code.co_filename.startswith(root):
        frame, level = frame.f_back, level + 1
    new = f"ganflow.{module_part}"
    warnings.warn(f"ganflow: the spec module '{module_part}' is deprecated (it stops working in the next release); "
                  f"write '{new}'", DeprecationWarning, stacklevel=level)
    return new


def registered_problems() -> dict[str, str]:
    """Registered problem names -> ``module:attr`` targets (entry points override built-ins)."""
    found = dict(_BUILTIN_PROBLEMS)
    for ep in entry_points(group=PROBLEM_GROUP):
        found[ep.name] = ep.value
    # Only list built-ins whose module is present.
    out = {}
    for name, target in sorted(found.items()):
        mod = target.split(":")[0]
        if importlib.util.find_spec(mod.split(".")[0]) is None:
            continue
        try:
            if importlib.util.find_spec(mod) is None:
                continue
        except ModuleNotFoundError:
            continue
        out[name] = target
    return out


def _is_file_spec(module_part: str) -> bool:
    return module_part.endswith(".py") or os.sep in module_part or "/" in module_part


def normalize_spec(spec: str) -> str:
    """A spec that stays valid from another working directory (file paths made absolute)."""
    if ":" in spec:
        module_part, attr = spec.rsplit(":", 1)
        if _is_file_spec(module_part):
            return f"{os.path.abspath(module_part)}:{attr}"
    return spec


def _import_file(path: str):
    if not os.path.isfile(path):
        raise GanflowError(f"spec file not found: {path}")
    path = os.path.abspath(path)
    name = "ganflow_user_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise GanflowError(f"cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except GanflowError:
        del sys.modules[name]
        raise
    except Exception as e:  # the user's file failed to import: report it as their error, in one line
        del sys.modules[name]
        raise GanflowError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise GanflowError(f"cannot import module '{name}': {e}") from e
    except GanflowError:
        raise
    except Exception as e:
        raise GanflowError(f"importing module '{name}' failed: {type(e).__name__}: {e}") from e


def resolve_spec(spec: str, group: str = PROBLEM_GROUP) -> Any:
    """Resolve a spec string to the object it names (not yet instantiated)."""
    if not isinstance(spec, str) or not spec.strip():
        raise GanflowError(f"empty or invalid spec string: {spec!r}")
    spec = spec.strip()
    if ":" not in spec:
        registry = registered_problems() if group == PROBLEM_GROUP else {}
        if spec not in registry:
            known = ", ".join(sorted(registry)) or "none"
            raise GanflowError(
                f"unknown name '{spec}' (registered: {known}; or use package.module:attr or path/file.py:attr)"
            )
        spec = registry[spec]
    module_part, attr = spec.rsplit(":", 1)
    if not module_part or not attr:
        raise GanflowError(f"spec '{spec}' must look like package.module:attr or path/file.py:attr")
    if _is_file_spec(module_part):
        module = _import_file(module_part)
    else:
        module = _import_module(_legacy_problems_alias(module_part))
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise GanflowError(f"spec '{spec}': '{module_part}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


def instantiate(obj: Any, kwargs: dict | None, is_instance: Callable[[Any], bool], what: str) -> Any:
    """Return ``obj`` if it already is the wanted kind of object, else call it as a factory with ``kwargs``.

    Unknown keyword arguments are an error (no silent ``**kwargs``).
    """
    kwargs = dict(kwargs or {})
    if is_instance(obj) and not inspect.isclass(obj):
        if kwargs:
            raise GanflowError(f"{what} is an object, not a factory: it takes no options ({', '.join(kwargs)})")
        return obj
    if not callable(obj):
        raise GanflowError(f"{what} spec names a {type(obj).__name__}, which is neither the object nor a factory")
    try:
        sig = inspect.signature(obj)
        params = sig.parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            allowed = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            unknown = sorted(set(kwargs) - allowed)
            if unknown:
                raise GanflowError(
                    f"unknown option(s) for {what}: {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
                )
    except (TypeError, ValueError):
        pass
    try:
        return obj(**kwargs)
    except GanflowError:
        raise
    except (TypeError, ValueError) as e:
        raise GanflowError(f"creating {what} failed: {e}") from e


def _looks_like_problem(o) -> bool:
    return all(hasattr(o, a) for a in ("make_operator", "sample_fields", "field_shape"))


def _looks_like_operator(o) -> bool:
    return hasattr(o, "obs_shape") and hasattr(o, "field_shape") and callable(o)


def _looks_like_generator(o) -> bool:
    return hasattr(o, "latent_dim") and hasattr(o, "field_shape") and callable(o)


def load_problem(spec: str, **kwargs):
    """A problem from a spec string; ``kwargs`` go to its factory (e.g. ``n=32``)."""
    problem = instantiate(resolve_spec(spec), kwargs, _looks_like_problem, f"problem '{spec}'")
    return check_problem(problem)


def _names_problem(obj) -> bool:
    """Whether a resolved spec names a problem (an object or its class), not an operator."""
    return _looks_like_problem(obj) or (
        inspect.isclass(obj) and hasattr(obj, "make_operator") and hasattr(obj, "sample_fields")
    )


def load_operator(spec: str | None = None, *, problem=None, problem_kwargs=None, **kwargs):
    """A forward operator from an operator spec, or from a problem (spec or object) via ``make_operator``.

    ``kwargs`` go to the operator's factory, or to ``make_operator`` when ``spec`` or ``problem`` names a problem;
    ``problem_kwargs`` go to the problem's factory (``load_operator("phase_retrieval", problem_kwargs={"n": 16})``
    is a 16x16 operator). A combination that would leave an argument unused is an error, never ignored.
    """
    if spec is not None and problem is not None:
        raise GanflowError("give an operator spec or a problem, not both")
    if spec is not None:
        obj = resolve_spec(spec)
        if not _names_problem(obj):
            if problem_kwargs:
                raise GanflowError(f"problem options ({', '.join(problem_kwargs)}) need a problem; "
                                   f"'{spec}' names an operator")
            return _checked_operator(instantiate(obj, kwargs, _looks_like_operator, f"operator '{spec}'"))
        problem = spec  # a problem spec names its default operator
    if problem is None:
        raise GanflowError("an operator needs --operator SPEC or --problem P")
    if isinstance(problem, str):
        problem = load_problem(problem, **(problem_kwargs or {}))
    elif problem_kwargs:
        raise GanflowError(f"problem options ({', '.join(problem_kwargs)}) need a problem spec; this problem is "
                           "an object already built (pass the options to its constructor)")
    try:
        op = problem.make_operator(**kwargs)
    except GanflowError:
        raise
    except TypeError as e:
        raise GanflowError(f"operator options for problem '{problem.name}': {e}") from e
    return _checked_operator(op)


def operator_settings(problem, kwargs: dict | None = None) -> dict:
    """Every setting of ``problem.make_operator(**kwargs)``, its defaults filled in, as plain JSON values.

    Two sets of operator options that differ only in what was left to a default (``{}`` and
    ``{"sensors": "grid:8"}`` when that is the default) build the same operator and give the same settings, so a
    record learnt for one (a recalibration scale) can be matched against the other. A factory whose signature
    cannot be read gives the options as written.
    """
    import json

    kwargs = dict(kwargs or {})
    try:
        bound = inspect.signature(problem.make_operator).bind(**kwargs)
    except (TypeError, ValueError):
        return json.loads(json.dumps(kwargs, default=str))
    bound.apply_defaults()
    settings = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        settings.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _checked_operator(op):
    op = check_operator(op)
    op.eval()
    return op


def load_generator_spec(spec: str, **kwargs):
    """A user's generator from a spec string (checkpoints are loaded by ``ganflow.load_prior``)."""
    gen = instantiate(resolve_spec(spec), kwargs, _looks_like_generator, f"generator '{spec}'")
    gen = check_generator(gen)
    gen.eval()
    return gen


# --- issue 16: the trust rule ---------------------------------------------------------------------------------
# ganflow's own problem package under its old and new module names (the built-ins move from `problems.` to
# `ganflow.problems.`): a spec into it names installed ganflow code, never code a file chose.
BUILTIN_PACKAGES = ("problems", "ganflow.problems")
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class UntrustedSpecError(GanflowError):
    """A spec read back from a file names code outside the registered problems and ganflow's own package."""


def _builtin_module_of_file(path: str) -> str | None:
    """``problems.<module>`` when ``path`` is a ``.py`` file directly inside a built-in problem package."""
    real = os.path.realpath(path)
    if not real.endswith(".py"):
        return None
    for package in BUILTIN_PACKAGES:
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for location in (found.submodule_search_locations or []) if found else []:
            if os.path.dirname(real) == os.path.realpath(location):
                return f"{package}.{os.path.basename(real)[:-3]}"
    return None


def _is_builtin_spec(spec: str) -> bool:
    """``problems.<module>:<name>`` or ``ganflow.problems.<module>:<name>`` (or the path of such a module's
    file), ``name`` a public object defined in that module (a single name: a dotted path could reach a function
    the module merely imported)."""
    module_part, _, attr = spec.rpartition(":")
    if _is_file_spec(module_part):
        module_part = _builtin_module_of_file(module_part) or ""
    package, _, module_name = module_part.rpartition(".")
    if package not in BUILTIN_PACKAGES or not _IDENTIFIER.fullmatch(module_name) or not _IDENTIFIER.fullmatch(attr):
        return False
    module = _import_builtin(module_part)
    obj = getattr(module, attr, None)
    return obj is not None and getattr(obj, "__module__", None) == module.__name__


def _import_builtin(module_part: str):
    """A built-in problem module under either of its names (``problems.X`` is ``ganflow.problems.X`` once the
    built-ins live there); None when neither imports: a module ganflow does not ship is not ours to vouch for."""
    short = module_part.removeprefix("ganflow.")
    for name in dict.fromkeys((module_part, short, f"ganflow.{short}")):
        try:
            return importlib.import_module(name)
        except Exception:
            continue
    return None


def check_spec_from_file(spec: str, where: str, flag: str) -> str:
    """The trust rule: return ``spec``, read back from a file, if resolving it imports no code the file chose.

    Resolved: a name without ``:`` (looked up among the registered problems only; a prior's path is opened as a
    weights-only checkpoint, never imported), the target of a registered problem, or a public object of a
    module of ganflow's built-in problem package. Refused with `UntrustedSpecError`: any other ``module:attr``
    or ``file.py:attr``, since the file may be someone else's and importing the module runs its top-level code.
    ``where`` names the file and attribute; ``flag`` the option that trusts the spec explicitly (``--problem``,
    ``--operator``, ``--prior``). Specs typed on the command line or passed in Python never come here.
    """
    text = str(spec).strip()
    if ":" not in text or text in registered_problems().values() or _is_builtin_spec(text):
        return text
    raise UntrustedSpecError(
        f"{where} names {text!r}, neither a registered problem nor part of ganflow, and code named by a file is "
        f"not run (trust rule, docs/reliability.md); to trust it, pass it yourself with {flag} (in Python: the "
        "argument of that name)"
    )
