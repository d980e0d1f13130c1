"""Load and validate recipes (YAML) with errors that name the file and the field."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import Recipe


class RecipeError(ValueError):
    """A recipe could not be read or is invalid; the message names the source and the field."""


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  - {loc}: {e['msg']}")
    return "\n".join(lines)


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe {source}: expected a mapping at the top level")
    try:
        return Recipe.model_validate(data)
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
    elif src.startswith("s3://"):
        from .io import storage

        text = storage.read_bytes(src).decode()
    else:
        path = Path(src.removeprefix("file://"))
        if not path.is_file():
            raise RecipeError(f"recipe {src!r} not found (not a file, and not one of the built-in "
                              f"recipes: {', '.join(sorted(shipped))})")
        text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {src} is not valid YAML: {err}") from None
    return recipe_from_dict(data, src)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_defaults=False), sort_keys=False)
