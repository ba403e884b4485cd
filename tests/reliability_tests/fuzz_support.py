"""QuantizedModel specs for the bad-input suite: valid ones drawn from the CRD's own schema, and
invalid ones made from a valid one by one deliberate violation that names the field it breaks.

Everything is read from crds/quantizedmodel.yaml (types, bounds, enums, patterns, lengths,
required fields); only the CEL rules need a hand-written violator each, and
``missing_rule_violators`` fails when the CRD gains a rule this module cannot break.
Pure data and hypothesis strategies: no cluster here.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from qmodel_operator.spec import quantity_value

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "quantizedmodel.yaml"
INT64 = (-(2**63), 2**63 - 1)
# Free-form strings and maps stay small: the schema's limits (1024 characters, 64 labels) are
# exercised by the violations below, and a small spec keeps 600 API calls within seconds.
MAX_TEXT, MAX_ENTRIES = 24, 3
# Any character JSON and the API server carry (no lone surrogates, which UTF-8 cannot encode).
TEXT = st.characters(codec="utf-8")
RESERVED_LABEL_PREFIXES = ("qmodel.dev/", "app.kubernetes.io/")
# Map keys the CRD checks with CEL (label keys, annotation keys, resource names): the structural
# schema cannot state a key pattern, so valid keys come from these instead of free text.
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$"
)
NATIVE = ("cpu", "memory", "ephemeral-storage")
RESOURCE_NAMES = (*NATIVE, "hugepages-2Mi", "example.com/widget")

Path_ = tuple[str, ...]  # keys from spec down; "[]" is the first item of a list
Spec = dict[str, Any]


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def spec_schema() -> dict[str, Any]:
    return crd_schema()["properties"]["spec"]


# --- valid values, from the schema ----------------------------------------------------------


def from_schema(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values the API server's structural schema accepts at ``node`` (CEL rules aside)."""
    strategy = _base_strategy(node)
    return st.none() | strategy if node.get("nullable") else strategy


def _base_strategy(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if node.get("x-kubernetes-int-or-string"):
        return st.integers(0, 2**40) | _string(node)
    kind = node.get("type")
    if kind == "object":
        return _object(node)
    if kind == "array":
        items = from_schema(node.get("items", {"type": "string"}))
        return st.lists(items, max_size=min(node.get("maxItems", MAX_ENTRIES), MAX_ENTRIES))
    if kind == "integer":
        if "x-kubernetes-validations" in node:  # groupSize: self != 0
            return st.integers(node.get("minimum", INT64[0]), node.get("maximum", INT64[1])).filter(bool)
        return st.integers(node.get("minimum", INT64[0]), node.get("maximum", INT64[1]))
    if kind == "number":
        return st.floats(
            node.get("minimum"),
            node.get("maximum"),
            exclude_min=bool(node.get("exclusiveMinimum")),
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "boolean":
        return st.booleans()
    return _string(node)


def _string(node: dict[str, Any]) -> st.SearchStrategy[str]:
    limit = node.get("maxLength", 1 << 20)
    if "pattern" in node:
        return st.from_regex(node["pattern"], fullmatch=True, alphabet=TEXT).filter(lambda s: len(s) <= limit)
    return st.text(TEXT, max_size=min(limit, MAX_TEXT))


def _object(node: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    props = node.get("properties", {})
    if props:
        required = set(node.get("required", ()))
        return st.fixed_dictionaries(
            {k: from_schema(v) for k, v in props.items() if k in required},
            optional={k: from_schema(v) for k, v in props.items() if k not in required},
        )
    values = from_schema(node.get("additionalProperties", {"type": "string"}))
    size = min(node.get("maxProperties", MAX_ENTRIES), MAX_ENTRIES)
    return st.dictionaries(_keys(node), values, max_size=size)


def _keys(node: dict[str, Any]) -> st.SearchStrategy[str]:
    messages = " ".join(r["message"] for r in node.get("x-kubernetes-validations", ()))
    if "resource names must be" in messages:
        return st.sampled_from(RESOURCE_NAMES)
    if "keys must be" in messages:  # label keys, annotation keys: a prefix of at most 253 characters
        return st.from_regex(LABEL_KEY, fullmatch=True).filter(lambda k: len(k.partition("/")[0]) <= 253)
    return st.text(TEXT, min_size=1, max_size=MAX_TEXT)


def satisfy_rules(spec: Spec) -> Spec:
    """The CRD's cross-field CEL rules, made to hold with the smallest change."""
    q = spec.get("quantization")
    if q:
        if q.get("staticGroups"):
            q.update(descAct=True, method="gptq")
            if q.get("groupSize") == -1:
                q["groupSize"] = 128
        if q.get("method") == "rtn" and q.get("descAct"):
            q["descAct"] = False
    strategy = (spec.get("serving") or {}).get("strategy")
    if strategy and strategy.get("maxSurge", 0) + strategy.get("maxUnavailable", 1) < 1:
        strategy["maxUnavailable"] = 1
    for section in ("serving", "jobs"):
        labels = (spec.get(section) or {}).get("podLabels")
        for key in [k for k in labels or () if k.startswith(RESERVED_LABEL_PREFIXES)]:
            del labels[key]
        for toleration in (spec.get(section) or {}).get("tolerations") or ():
            _satisfy_toleration(toleration)
        resources = (spec.get(section) or {}).get("resources")
        if resources:
            _satisfy_resources(resources)
    return spec


def _satisfy_resources(resources: dict[str, Any]) -> None:
    """core/v1's resource rules, as the CRD's CEL rules state them: whole extended resources,
    hugepages in whole pages, no overcommitted extended resource, no request over its limit."""
    for part in ("requests", "limits"):
        for key in list(resources.get(part) or {}):
            if "/" in key:
                resources[part][key] = 2
            elif key.startswith("hugepages-"):
                resources[part][key] = "4Mi"
    for key, value in (resources.get("requests") or {}).items():
        limit = (resources.get("limits") or {}).get(key)
        if key not in NATIVE or (limit is not None and quantity_value(value) > quantity_value(limit)):
            resources.setdefault("limits", {})[key] = value


def _satisfy_toleration(toleration: dict[str, Any]) -> None:
    """core/v1's toleration rules, as the CRD's CEL rules state them."""
    if len(toleration.get("key", "").partition("/")[0]) > 253:
        toleration["key"] = "example.com/key"
    if not toleration.get("key"):
        toleration["operator"] = "Exists"
    if toleration.get("operator") == "Exists":
        toleration.pop("value", None)
    if "tolerationSeconds" in toleration:
        toleration["effect"] = "NoExecute"


def valid_specs() -> st.SearchStrategy[Spec]:
    return from_schema(spec_schema()).map(satisfy_rules)


# --- violations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    """One way to break a valid spec, and what the API server's refusal must say."""

    kind: str
    path: Path_  # where, from spec down ("metadata", "name") for the name rule
    value: Any = None  # set at ``path``; ``DELETE`` removes the field instead
    expect: str = ""  # a phrase the refusal must contain besides the field's path
    setup: Callable[[Spec], None] | None = None  # makes the rule's precondition hold
    at: Path_ | None = None  # the field the refusal names, when not ``path`` (a CEL rule's object)

    @property
    def field(self) -> str:
        """The field as the API server names it: spec.serving.tolerations[0].operator."""
        path = self.path if self.at is None else self.at
        dotted = ".".join(path).replace(".[]", "[0]")
        return dotted if path[0] == "metadata" else f"spec.{dotted}"

    def apply(self, spec: Spec, name: str) -> tuple[str, Spec]:
        spec = copy.deepcopy(spec)
        if self.setup is not None:
            self.setup(spec)
        if self.path[0] == "metadata":
            return self.value, spec
        holder, key = _parent(spec, self.path), self.path[-1]
        if self.value is DELETE:
            holder.pop(key, None)
        else:
            holder[0 if key == "[]" else key] = self.value
        return name, spec


DELETE = object()


def _parent(spec: Spec, path: Path_) -> Any:
    """The object holding ``path``'s last key, created on the way (a list gets one item)."""
    node: Any = spec
    for key, following in itertools.pairwise(path):
        if following == "[]":
            items = node.get(key)
            node[key] = items if isinstance(items, list) and items else [{}]
            node = node[key]
        elif key == "[]":
            node = node[0]
        else:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
    return node


def leaves(node: dict[str, Any], path: Path_ = ()) -> Iterator[tuple[Path_, dict[str, Any]]]:
    """Every schema node under ``node`` with its path (object properties and list items)."""
    for key, child in node.get("properties", {}).items():
        yield (*path, key), child
        yield from leaves(child, (*path, key))
    if "items" in node:
        yield from leaves(node["items"], (*path, "[]"))


def schema_violations(schema: dict[str, Any]) -> list[Violation]:
    """One violation per constraint the schema states, at the field that states it."""
    out: list[Violation] = []
    for path, node in leaves(schema):
        out += _violations_at(path, node)
        for key in node.get("required", ()):
            out.append(Violation("required", (*path, key), DELETE, "Required value"))
    for key in schema.get("required", ()):
        out.append(Violation("required", (key,), DELETE, "Required value"))
    out.append(Violation("unknown", ("bogusField",), 1, "unknown field"))
    return out


def _violations_at(path: Path_, node: dict[str, Any]) -> list[Violation]:
    out = []
    kind = node.get("type")
    wrong = {"integer": "many", "number": "much", "boolean": "yes", "string": 12345}.get(kind, "text")
    if not node.get("x-kubernetes-int-or-string"):
        out.append(Violation("type", path, wrong, "must be of type"))
    if "enum" in node:
        bogus = 99 if kind == "integer" else "Bogus"
        out.append(Violation("enum", path, bogus, "Unsupported value"))
    if "minimum" in node:
        low = node["minimum"] if node.get("exclusiveMinimum") else node["minimum"] - 1
        out.append(Violation("minimum", path, low, "should be greater than"))
    if "maximum" in node:
        out.append(Violation("maximum", path, node["maximum"] + 1, "should be less than or equal to"))
    if "pattern" in node:
        bad = next(
            v for v in ("Not A/Valid Value", "control\x01character") if not re.search(node["pattern"], v)
        )
        out.append(Violation("pattern", path, bad, "should match"))
    if "maxLength" in node:
        out.append(Violation("maxLength", path, "a" * (node["maxLength"] + 1), "Too long"))
    if "maxItems" in node:
        out.append(Violation("maxItems", path, ["x"] * (node["maxItems"] + 1), "Too many"))
    if "maxProperties" in node:
        too_many = {f"k{i}": "v" for i in range(node["maxProperties"] + 1)}
        out.append(Violation("maxProperties", path, too_many, "Too many"))
    if kind == "object" and "properties" in node:
        out.append(Violation("unknown", (*path, "bogusField"), 1, "unknown field"))
    return out


# CEL rules: (the field whose rule it is, the rule's message as in the CRD) -> a spec breaking it.
def _set(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda section: section.update(values)


RULE_VIOLATORS: dict[tuple[Path_, str], tuple[Path_, Any, Callable[[Spec], None] | None]] = {}


def _rule(field: Path_, message_start: str, path: Path_, value: Any, setup=None) -> None:
    RULE_VIOLATORS[(field, message_start)] = (path, value, setup)


def _quantization(**values: Any) -> Callable[[Spec], None]:
    return lambda spec: _parent(spec, ("quantization", "x")).update(values)


_rule((), "metadata.name must be", ("metadata", "name"), "m" * 46)
_rule(("quantization",), "staticGroups requires", ("quantization", "staticGroups"), True,
      _quantization(descAct=False))  # fmt: skip
_rule(("quantization",), "staticGroups needs groups", ("quantization", "groupSize"), -1,
      _quantization(staticGroups=True, descAct=True, method="gptq"))  # fmt: skip
_rule(("quantization",), "descAct and staticGroups", ("quantization", "method"), "rtn",
      _quantization(descAct=True, staticGroups=False))  # fmt: skip
_rule(("quantization", "groupSize"), "groupSize must be", ("quantization", "groupSize"), 0)
_rule(("artifacts", "uri"), "artifacts.uri is immutable", (), None)  # updates only: see test_k8s_admission
_rule(("serving", "strategy"), "maxSurge and maxUnavailable", ("serving", "strategy", "maxUnavailable"), 0,
      lambda spec: _parent(spec, ("serving", "strategy", "x")).update(maxSurge=0))  # fmt: skip
_TOLERATIONS_BROKEN = {
    "a toleration without a key": {"operator": "Equal", "value": "x"},  # core/v1 refused `{"key": ""}`
    "a toleration with operator Exists": {"key": "example.com/k", "operator": "Exists", "value": "x"},
    "tolerationSeconds applies": {
        "key": "k",
        "operator": "Exists",
        "effect": "NoSchedule",
        "tolerationSeconds": 5,
    },
}
for _section in ("serving", "jobs"):
    _rule(
        (_section, "podLabels"), "podLabels may not use", (_section, "podLabels"), {"qmodel.dev/model": "x"}
    )
    _rule((_section, "podLabels"), "podLabels keys must be", (_section, "podLabels"), {"\u00fc": "x"})
    _rule(
        (_section, "nodeSelector"), "nodeSelector keys must be", (_section, "nodeSelector"), {"a.-b/x": "y"}
    )
    _rule(
        (_section, "podAnnotations"), "podAnnotations keys must be", (_section, "podAnnotations"), {"a b": ""}
    )
    for _kind in ("requests", "limits"):
        _rule(
            (_section, "resources", _kind),
            "resource names must be",
            (_section, "resources", _kind),
            {"gpu": 1},
        )
    _resources = (_section, "resources")
    _rule(_resources, "hugepages and extended resources", _resources, {"requests": {"example.com/widget": 1}})
    _rule(_resources, "a request may not exceed", _resources,
          {"requests": {"memory": "2Gi"}, "limits": {"memory": "1.5Gi"}})  # fmt: skip
    _rule((*_resources, "limits"), "extended resources (such", (*_resources, "limits"),
          {"example.com/widget": "1500m"})  # fmt: skip
    _rule((*_resources, "limits"), "a hugepages-<size> amount", (*_resources, "limits"),
          {"hugepages-2Mi": "3Mi"})  # fmt: skip
    _rule((*_resources, "requests"), "extended resources (such", (*_resources, "requests"),
          {"example.com/widget": "1500m"})  # fmt: skip
    _rule((*_resources, "requests"), "a hugepages-<size> amount", (*_resources, "requests"),
          {"hugepages-2Mi": "3Mi"})  # fmt: skip
    for _start, _broken in _TOLERATIONS_BROKEN.items():
        _rule((_section, "tolerations", "[]"), _start, (_section, "tolerations", "[]"), _broken)
    _key = (_section, "tolerations", "[]", "key")
    _rule(_key, "a toleration key's prefix", _key, "a" * 254 + "/k")


def cel_rules(schema: dict[str, Any]) -> list[tuple[Path_, str]]:
    """(field, message) of every CEL rule in the CRD; () is the object's root (metadata)."""
    rules = [((), r["message"]) for r in crd_schema().get("x-kubernetes-validations", ())]
    for path, node in leaves(schema):
        rules += [(path, r["message"]) for r in node.get("x-kubernetes-validations", ())]
    return rules


def _violator(field: Path_, message: str):
    return next(
        (v for (f, start), v in RULE_VIOLATORS.items() if f == field and message.startswith(start)), None
    )


def missing_rule_violators(schema: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(f) or '<root>'}: {m}" for f, m in cel_rules(schema) if _violator(f, m) is None]


def rule_violations(schema: dict[str, Any]) -> list[Violation]:
    out = []
    for field, message in cel_rules(schema):
        found = _violator(field, message)
        if found is None or not found[0]:  # no violator, or one only an update can break
            continue
        path, value, setup = found
        # The API server quotes the rule's message verbatim; folded YAML has no line breaks.
        at = field or ("metadata", "name")  # the root's one rule is about the name
        out.append(Violation("cel", path, value, re.sub(r"\s+", " ", message)[:60], setup, at))
    return out


def all_violations() -> list[Violation]:
    schema = spec_schema()
    return schema_violations(schema) + rule_violations(schema)


# --- cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    spec: Spec
    violation: Violation | None  # None: a valid spec


def break_in_turn(drawn: list[Spec], violations: list[Violation]) -> list[Case]:
    """Every other spec is broken, the k-th of them by violation k (mod their number), so every
    violation is used, evenly: drawing them with hypothesis favours a list's first elements (153
    of 267 were CEL rules in one try), and its booleans favour False (383 of 600)."""
    out = []
    for i, spec in enumerate(drawn):
        if i % 2 == 0:
            out.append(Case("", spec, None))
            continue
        violation = violations[(i // 2) % len(violations)]
        out.append(Case(*violation.apply(spec, ""), violation))
    return out


# --- the report -----------------------------------------------------------------------------

TABLE_COLUMNS = ("specs generated", "valid", "invalid", "rejected", "reconciled", "exceptions")


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """A Markdown table: one row per suite, the README's columns."""
    head = "| suite | " + " | ".join(TABLE_COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(TABLE_COLUMNS)
    lines = [head, rule]
    for label, figures in rows:
        lines.append(f"| {label} | " + " | ".join(str(figures.get(c, "-")) for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines)
