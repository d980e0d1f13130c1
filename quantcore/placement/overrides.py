"""Name-based placement policy: ``keep_float`` globs and recipe :class:`~quantcore.config.Override` s.

Matching: ``fnmatch`` (case-sensitive) against module names (``blocks.4.mlp.fc2``) and quantizer names
(``blocks.4.mlp.fc2.input_quantizer``); a pattern that matches a module also covers everything below
it (a float module has no quantized descendants; a spec patch on a module patches all its
quantizers). Rules apply in order and the later one wins: ``keep_float`` globs first, then the
overrides. ``float: true`` leaves modules float (or removes a matched quantizer); an explicit
``float: false`` re-quantizes what an earlier rule (e.g. a family default) left float. ``spec`` /
``enabled`` patch the spec of matched quantizers. A rule that matches nothing raises ``ValueError``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Iterable

from ..config import Override, SpecPatch
from ..errors import PlacementError, one_line
from ..formats import QuantSpec


@dataclass
class Rule:
    pattern: str
    float: bool | None = None
    patch: SpecPatch | None = None
    enabled: bool | None = None
    source: str = ""
    user: bool = True  # family defaults may match nothing
    hits: set[str] = field(default_factory=set)

    @property
    def changes_spec(self) -> bool:
        return self.patch is not None or self.enabled is not None


def _ancestors_and_self(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def matches(pattern: str, name: str) -> bool:
    """``pattern`` matches ``name`` itself or one of its ancestors."""
    return any(fnmatchcase(n, pattern) for n in _ancestors_and_self(name))


def build_rules(keep_float: list[str] | None, default_keep_float: list[str],
                overrides: Iterable[Override | dict]) -> list[Rule]:
    rules: list[Rule] = []
    if keep_float is None:
        rules += [Rule(p, float=True, source=f"default keep_float {p!r}", user=False) for p in default_keep_float]
    else:
        rules += [Rule(p, float=True, source=f"keep_float {p!r}") for p in keep_float]
    for i, ov in enumerate(overrides):
        ov = ov if isinstance(ov, Override) else Override.model_validate(ov)
        fl = ov.float  # None: no decision (an explicit false re-quantizes what the family keeps float)
        rule = Rule(ov.match, float=fl, patch=ov.spec, enabled=ov.enabled, source=f"overrides[{i}] {ov.match!r}")
        if rule.float is None and not rule.changes_spec:
            raise PlacementError(f"override {ov.match!r} (overrides[{i}]) sets none of float, spec, enabled")
        rules.append(rule)
    return rules


def decide_float(name: str, rules: list[Rule], default: bool = False) -> bool:
    """Whether module ``name`` stays float: the last rule with a float decision that matches wins."""
    decision = default
    for r in rules:
        if r.float is not None and matches(r.pattern, name):
            r.hits.add(name)
            decision = r.float
    return decision


def mark_module_hits(module_names: Iterable[str], rules: list[Rule]) -> None:
    """Record which rules match some module name (for the 'matches nothing' check)."""
    for name in module_names:
        for r in rules:
            if fnmatchcase(name, r.pattern):
                r.hits.add(name)


def apply_quantizer_rules(specs: dict[str, QuantSpec], rules: list[Rule]
                          ) -> tuple[dict[str, QuantSpec], dict[str, str], dict[str, list[str]]]:
    """Apply the rules to planned quantizers (name -> spec), in order.

    Returns the final spec of every quantizer, the quantizers a float rule removes (name -> that rule;
    the last matching float decision wins) and, per rule source, the quantizers whose spec it patched."""
    final: dict[str, QuantSpec] = {}
    remove: dict[str, str] = {}  # quantizer -> the rule whose float decision removes it
    spec_hits: dict[str, list[str]] = {}
    # rule setting grid fields -> what each quantizer it patched became: None for a grid, or the float cast
    grid_hits: dict[str, tuple[Rule, list[str | None]]] = {}
    for qname, spec in specs.items():
        floated, floated_by = False, ""
        percentile_by = None  # the override that set a percentile: it must end up read
        for r in rules:
            if not matches(r.pattern, qname):
                continue
            r.hits.add(qname)
            if r.float is not None:
                floated, floated_by = r.float, r.source
            if r.changes_spec:
                if r.patch is not None:
                    if r.patch.percentile is not None:
                        percentile_by = r.source
                    try:
                        spec = r.patch.apply(spec)
                    except ValueError as e:
                        raise PlacementError(f"{r.source} gives an invalid spec for quantizer {qname!r} (before the "
                                             f"override: {spec.short()}): {one_line(e)}") from None
                    if r.patch.grid_fields():
                        grid_hits.setdefault(r.source, (r, []))[1].append(f"{qname} ({spec.format})" if spec.is_float
                                                                          else None)
                if r.enabled is not None:
                    spec = QuantSpec.model_validate({**spec.model_dump(), "enabled": r.enabled})
                spec_hits.setdefault(r.source, []).append(qname)
        if percentile_by and not floated and spec.on_grid and spec.calibrator != "percentile":
            raise PlacementError(f"{percentile_by} sets percentile for quantizer {qname!r}, whose calibrator is "
                                 f"{spec.calibrator!r}: percentile applies to calibrator percentile only")
        if floated:
            remove[qname] = floated_by
        final[qname] = spec
    for r, casts in grid_hits.values():
        if None not in casts:  # every quantizer it patched is a float cast: its grid fields would be dropped
            fields = r.patch.grid_fields()
            raise PlacementError(f"{r.source} sets {', '.join(fields)}, but every quantizer it matches is a float "
                                 f"cast, which has no integer grid, range or calibration: {', '.join(casts[:4])}"
                                 f"{' ...' if len(casts) > 4 else ''}; set format: int there too, or drop "
                                 f"{', '.join(fields)}")
    return final, remove, spec_hits


def module_aliases(model: Any) -> dict[str, str]:
    """Other names of modules registered more than once (``self.b = self.a``): alias -> the name
    ``named_modules`` gives it (the first), by which placement names its quantizers."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in first:
            if name != first[id(m)]:
                out[name] = first[id(m)]
        else:
            first[id(m)] = name
    return out


def _alias_hint(pattern: str, aliases: dict[str, str]) -> str:
    hit = next(((a, n) for a, n in aliases.items() if fnmatchcase(a, pattern) or
                any(fnmatchcase(f"{a}.{rest}", pattern) for rest in ("input_quantizer", "weight_quantizer",
                                                                      "output_quantizer"))), None)
    if hit is None:
        return ""
    return (f": {hit[0]!r} is another name of module {hit[1]!r} (one module registered twice); rules and "
            f"quantizers use its first name, {hit[1]!r}")


def _kept_float_by(rule: Rule, rules: list[Rule]) -> tuple[str, str] | None:
    """(module, rule source) when ``rule``'s pattern names quantizers (``*_quantizer``) of a module
    another rule, before or after it, leaves float (its quantizers were never placed, so the pattern
    meets nothing); None for anything else (a typo in the name is told to check it)."""
    parent, _, leaf = rule.pattern.rpartition(".")
    if not parent or not leaf.endswith("_quantizer"):
        return None
    for r in rules:
        if r is not rule and r.float:
            for mod in sorted(r.hits):
                if fnmatchcase(mod, parent) or matches(parent, mod):
                    return mod, r.source
    return None


def check_all_matched(rules: list[Rule], spec_hits: dict[str, list[str]],
                      aliases: dict[str, str] | None = None) -> None:
    """Raise ValueError for a user rule that matched nothing (silent no-ops hide typos); a rule naming
    a module by a second name (``aliases``, :func:`module_aliases`) is told the name to use."""
    for r in rules:
        if not r.user:
            continue
        hint = "" if r.hits else _alias_hint(r.pattern, aliases or {})
        if hint:
            raise PlacementError(f"{r.source} matches no module and no quantizer of this model{hint}")
        if r.float is not None and not r.hits:
            raise PlacementError(f"{r.source} matches no module and no quantizer of this model "
                             "(check the name; module names look like 'blocks.4.mlp.fc2')")
        if r.changes_spec and not spec_hits.get(r.source):
            if r.hits:
                some = sorted(r.hits)[:5]
                by = next((o for o in rules if o.float and o is not r and o.hits & r.hits), None)
                if by is not None:
                    fix = ("leave them out of one of the two rules" if by.user else
                           "add an override with float: false for them to quantize them")
                    raise PlacementError(f"{r.source} matches {some} but no quantizer there: {by.source} keeps "
                                         f"those modules float (a float module has no quantizers, whatever order "
                                         f"the rules come in); {fix}")
                raise PlacementError(f"{r.source} matches {some} but no quantizer there: those modules are "
                                 "float (add float: false to quantize them) or have no quantizers")
            kept = _kept_float_by(r, rules)
            if kept:
                mod, by = kept
                raise PlacementError(f"{r.source} matches the quantizers of module {mod!r}, which {by} keeps "
                                     f"float (float: true), so they do not exist; to quantize that module, "
                                     f"leave it out of that rule or give it float: false in an override "
                                     f"after it")
            raise PlacementError(f"{r.source} matches no module and no quantizer of this model "
                             "(check the name; quantizer names look like "
                             "'blocks.4.mlp.fc2.input_quantizer')")
