"""Load and validate recipes (YAML) with errors that name the file and the field."""
from __future__ import annotations

import os
import posixpath
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import Recipe
from .errors import UserError
from .yaml_input import DuplicateKeyError, load_yaml


class RecipeError(UserError):
    """A recipe could not be read or is invalid; the message names the source and the field."""


def _format_errors(source: str, err: ValidationError) -> str:
    """One line: ``invalid recipe SRC: field.path: message; other.field: message``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)  # whole-recipe checks name their fields themselves
    return f"invalid recipe {source}: " + "; ".join(parts)


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>", stored: bool = False,
                     written: bool = False) -> Recipe:
    """Validate ``data``; ``stored``: a recipe read back from a checkpoint (options refused since it
    was written do not make it unreadable, see :func:`quantcore.config._stored`); ``written``: read from
    a recipe file, where every field present was written by someone (see ``Recipe._calibration_applies``)."""
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe {source}: expected a mapping at the top level")
    try:
        context = {"stored": True} if stored else ({"written": True} if written else None)
        return Recipe.model_validate(data, context=context)
    except ValidationError as err:
        raise RecipeError(_format_errors(source, err)) from None


def builtin_recipes() -> dict[str, Path]:
    """Recipes shipped with the package, by name (file stem)."""
    root = resources.files("quantcore") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".yaml")}


def load_recipe(source: str | Path | dict[str, Any]) -> Recipe:
    """A recipe from a dict, a built-in name, a local YAML path or a storage URI (s3://...)."""
    if isinstance(source, dict):
        return recipe_from_dict(source)
    src = str(source)
    shipped = builtin_recipes()
    if src in shipped:
        text = shipped[src].read_text()
    elif _is_s3(src):
        from .io import storage

        try:
            raw = storage.read_bytes(src)
        except FileNotFoundError:
            raise RecipeError(f"recipe {src} not found") from None
        text = _decode(raw, src)
    else:
        what = "a recipe is a dict, a built-in name, a YAML file's path or a storage URI (s3://...)"
        if "\n" in src:  # YAML text, not a name: its own text as a file name fails with OSError
            raise RecipeError(f"{what}, not YAML text (got {src[:40]!r}...): pass yaml.safe_load(text) as a dict, "
                              "or the path of the file")
        path = Path(_local(src))
        try:
            found = path.is_file()
        except OSError as err:  # a name too long for the file system, ...
            raise RecipeError(f"recipe {src[:80]!r}: not a file ({err.strerror}); {what}") from None
        if not found:
            raise RecipeError(f"recipe {src!r} not found (not a file, and not one of the built-in "
                              f"recipes: {', '.join(sorted(shipped))})")
        text = _decode(path.read_bytes(), src)
    try:
        data = load_yaml(text, f"recipe {src}")
    except DuplicateKeyError as err:
        raise RecipeError(str(err)) from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {src} is not valid YAML: {' '.join(str(err).replace('<unicode string>', src).split())}") from None
    if src not in shipped:
        _relative_to_recipe(data, src)
        _name_from_file(data, src)
    return recipe_from_dict(data, src, written=True)


def _name_from_file(data: Any, src: str) -> None:
    """A recipe file without ``name:`` is named after the file (``int8_fast.yaml`` -> ``int8_fast``), as
    built-in recipes are: two such files in one run would otherwise both be ``custom`` (refused as a
    duplicate) and their outputs would share one folder name. A stem that is not a valid recipe name
    leaves the default."""
    if not isinstance(data, dict) or "name" in data:
        return
    from .config import recipe_name_problem

    stem = posixpath.splitext(posixpath.basename(src.rstrip("/")))[0]
    if recipe_name_problem(stem) is None and stem.lower() != "fp32":  # FP32.yaml too: a report's reference
        data["name"] = stem


#: recipe fields holding a weights file: a relative path there is relative to the recipe file
_FILE_FIELDS = ("checkpoint", "pretrained_file")


def _relative_to_recipe(data: Any, src: str) -> None:
    """Resolve relative ``model.checkpoint``/``model.pretrained_file`` paths, and a ``model.name`` written
    as a relative path (``./``, ``../``: a model directory), against the recipe's own folder (or S3
    prefix), as Helm values or compose files do: resolved against the working directory, the same recipe
    loaded another model depending on where it was run from. A bare ``model.name`` is a registry name
    (or a directory in the working directory)."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        return
    for key in ("name", *_FILE_FIELDS):
        val = model.get(key)
        # a name is a path only when written as one (a model directory, HF); else a registry name
        if isinstance(val, str) and val and (key != "name" or val.startswith(("./", "../"))):
            try:
                model[key] = relative_to_file(val, src)
            except ValueError as err:
                raise RecipeError(f"recipe {src}: model.{key} {val!r} {err}") from None


def relative_to_file(val: str, src: str) -> str:
    """``val`` as written in the file ``src`` (local path, ``file://`` or ``s3://``): a relative path is
    resolved against ``src``'s folder or S3 prefix; URIs and absolute paths are returned as they are.
    ValueError when a relative S3 path leads above the bucket's root."""
    if "://" in val or os.path.isabs(os.path.expanduser(val)):
        return val
    if _is_s3(src):
        from .io.uri import parse_uri, s3_uri

        # S3 keys are not paths, but ``../w/fp32.pt`` means the same as on a disk: the ``.`` and ``..``
        # segments are resolved, never sent as a literal key. Every other segment is kept as written,
        # empty ones too: ``a//b`` and ``a/b`` are two keys (normpath merged them, so a recipe under
        # ``rr//exp/`` loaded the weights of ``rr/exp/``).
        p = parse_uri(src)
        segments = p.key.split("/")[:-1]  # the recipe's "folder", '' segments included
        for seg in val.split("/"):
            if seg == "..":
                if not segments:
                    raise ValueError("leads above the bucket's root")
                segments.pop()
            elif seg != ".":
                segments.append(seg)
        key = "/".join(segments)
        # a trailing '/' names a folder, as on a disk, where it is dropped: so it is here (a sweep's run
        # fingerprint includes the resolved URIs)
        return s3_uri(p.bucket, key[:-1] if val.endswith("/") and key.endswith("/") else key)
    return str((Path(_local(src)).resolve().parent / val).resolve())


def _is_s3(src: str) -> bool:
    from .io.uri import is_s3

    return is_s3(src)


def _local(src: str) -> str:
    """A local path or ``file://`` URI as a path, by the storage layer's rules (``%20`` decoded,
    ``file://localhost/``); malformed URIs are named."""
    from .io.uri import local_path

    try:
        return local_path(src)
    except ValueError as e:
        raise RecipeError(f"recipe {src!r}: {e}") from None


def _decode(raw: bytes, src: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (Windows editors) is no content
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe {src} is not a UTF-8 text (YAML) file: {err}") from None


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML with every field spelled out, except ``calibration`` fields that act on nothing
    here (:meth:`Recipe.inert_calibration_fields`): written, they would be refused when the dump is loaded."""
    d = recipe.model_dump(mode="json", exclude_defaults=False)
    for field in recipe.inert_calibration_fields():
        d.get("calibration", {}).pop(field, None)
    return yaml.safe_dump(d, sort_keys=False)
