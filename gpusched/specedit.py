"""Edit TAO experiment specs (protobuf text format) without hand edits.

Pure: no I/O. ``apply_overrides(text, {"training_config.num_epochs": 10})`` replaces the value
of a scalar field that the spec already has and keeps everything else (comments, layout, other
fields) byte for byte. A path the spec does not hold is an error that names the nearest fields:
a typo must not silently train for the spec's 80 epochs. ``gpusched tao --set`` and a pipeline
stage's ``overrides = {...}`` both come here.

Paths are dotted field names through nested blocks (``training_config.learning_rate.
soft_start_annealing_schedule.max_learning_rate``); a repeated block is picked with ``[i]``
(``dataset_config.target_class_mapping[1].value``), the first one otherwise.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from gpusched.errors import SpecError

__all__ = ["apply_overrides", "parse_set", "parse_value"]

_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+) | (?P<comment>\#[^\n]*) |
    (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*') |
    (?P<punct>[{}<>\[\]:,;]) |
    (?P<word>[^\s{}<>\[\]:,;"'\#]+)
""", re.VERBOSE)
_SEGMENT_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BOOL_WORDS = {"true": True, "false": False, "True": True, "False": False, "t": True,
               "f": False}
_INT_RE = re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$")
_FLOAT_RE = re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?[fF]?$|^[-+]?(?:inf|nan)$",
                       re.IGNORECASE)


@dataclass
class _Tok:
    kind: str
    text: str
    start: int
    end: int


@dataclass
class _Field:
    name: str
    # a scalar: the span of its value tokens; a block: its fields
    start: int = 0
    end: int = 0
    kind: str = "scalar"  # scalar | block | list
    value: list[_Tok] = field(default_factory=list)
    fields: list[_Field] = field(default_factory=list)


def _tokens(text: str) -> list[_Tok]:
    out = []
    pos = 0
    for m in _TOKEN_RE.finditer(text):
        if m.start() != pos:
            raise SpecError(f"spec: cannot read the text at offset {pos}")
        pos = m.end()
        kind = m.lastgroup or ""
        if kind in ("ws", "comment"):
            continue
        out.append(_Tok(kind, m[kind], m.start(), m.end()))
    if pos != len(text):
        raise SpecError(f"spec: cannot read the text at offset {pos}")
    return out


def _parse(toks: list[_Tok], i: int, closer: str | None) -> tuple[list[_Field], int]:
    fields: list[_Field] = []
    n = len(toks)
    while i < n:
        t = toks[i]
        if t.kind == "punct" and t.text in "}>":
            if closer is None or t.text != closer:
                raise SpecError(f"spec: unexpected {t.text!r} at offset {t.start}")
            return fields, i + 1
        if t.kind == "punct" and t.text in ",;":
            i += 1
            continue
        if t.kind != "word":
            raise SpecError(f"spec: expected a field name at offset {t.start}, got {t.text!r}")
        f = _Field(t.text)
        j = i + 1
        if j < n and toks[j].text == ":" and toks[j].kind == "punct":
            j += 1
        if j >= n:
            raise SpecError(f"spec: field {t.text} has no value")
        nt = toks[j]
        if nt.kind == "punct" and nt.text in "{<":
            f.kind = "block"
            f.fields, i = _parse(toks, j + 1, "}" if nt.text == "{" else ">")
        elif nt.kind == "punct" and nt.text == "[":
            f.kind = "list"
            k = j + 1
            while k < n and not (toks[k].kind == "punct" and toks[k].text == "]"):
                k += 1
            if k >= n:
                raise SpecError(f"spec: list of {t.text} is not closed")
            f.start, f.end = nt.start, toks[k].end
            i = k + 1
        elif nt.kind in ("word", "str"):
            k = j + 1
            while nt.kind == "str" and k < n and toks[k].kind == "str":  # "a" "b" concatenate
                k += 1
            f.value = toks[j:k]
            f.start, f.end = toks[j].start, toks[k - 1].end
            i = k
        else:
            raise SpecError(f"spec: field {t.text} has no value (offset {nt.start})")
        fields.append(f)
    if closer is not None:
        raise SpecError("spec: a block is not closed (missing '}')")
    return fields, i


def parse_value(text: str) -> Any:
    """``--set`` value text -> bool, int, float or str (quotes stripped)."""
    s = text.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        return s[1:-1]
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    if _INT_RE.match(s):
        return int(s)
    if _FLOAT_RE.match(s) and not s.lower().endswith("f"):
        return float(s)
    return s


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["training_config.num_epochs=10", ...]`` -> ``{"training_config.num_epochs": 10}``;
    values typed by :func:`parse_value`. A later item for the same path wins."""
    out: dict[str, Any] = {}
    for item in items:
        path, sep, value = item.partition("=")
        path = path.strip()
        if not sep or not path:
            raise SpecError(f"bad --set {item!r}: use PATH=VALUE, e.g. "
                            "training_config.num_epochs=10")
        _segments(path)
        out[path] = parse_value(value)
    return out


def _segments(path: str) -> list[tuple[str, int | None]]:
    segs = []
    for part in path.split("."):
        m = _SEGMENT_RE.match(part.strip())
        if not m:
            raise SpecError(f"bad spec path {path!r}: use dotted field names like "
                            "training_config.num_epochs (a repeated block: name[1])")
        segs.append((m[1], int(m[2]) if m[2] is not None else None))
    return segs


def _quote(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _render(path: str, f: _Field, value: Any) -> str:
    """The new value text, in the form the field already has (quoted string, enum, number,
    bool); a value of the wrong kind is refused."""
    old = f.value[0]
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"--set {path}: {value} is not a usable number")
    if old.kind == "str":
        return _quote(value if isinstance(value, str) else
                      ("true" if value is True else "false") if isinstance(value, bool)
                      else repr(value) if isinstance(value, float) else str(value))
    word = old.text
    if word in _BOOL_WORDS:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int) and value in (0, 1):
            return "true" if value else "false"
        raise SpecError(f"--set {path}: the spec's value is a bool ({word}); give true or false, "
                        f"not {value!r}")
    if _INT_RE.match(word) or _FLOAT_RE.match(word):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"--set {path}: the spec's value is a number ({word}); "
                            f"{value!r} is not")
        if isinstance(value, float) and _INT_RE.match(word) and not value.is_integer():
            raise SpecError(f"--set {path}: the spec's value is a whole number ({word}); "
                            f"{value!r} is not")
        if isinstance(value, float) and _INT_RE.match(word):
            return str(int(value))
        return repr(value) if isinstance(value, float) else str(value)
    # an enum identifier (average_precision_mode: SAMPLE, regularizer type: L1)
    if isinstance(value, str) and _IDENT_RE.match(value):
        return value
    raise SpecError(f"--set {path}: the spec's value is a name ({word}); give a name like it, "
                    f"not {value!r}")


def _nearest(name: str, fields: list[_Field], where: str) -> str:
    names = sorted({f.name for f in fields})
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return (f"{hint}{where or 'the spec'} has: {', '.join(names) if names else 'no fields'}")


def _find(fields: list[_Field], path: str) -> _Field:
    segs = _segments(path)
    here = fields
    where: list[str] = []
    for depth, (name, index) in enumerate(segs):
        matches = [f for f in here if f.name == name]
        loc = ".".join(where)
        if not matches:
            raise SpecError(f"--set {path}: the spec has no {'.'.join([*where, name])}; "
                            f"{_nearest(name, here, loc)}")
        k = index or 0
        if k >= len(matches):
            raise SpecError(f"--set {path}: the spec has {len(matches)} {name} "
                            f"(use [0]..[{len(matches) - 1}])")
        f = matches[k]
        where.append(name if index is None else f"{name}[{index}]")
        last = depth == len(segs) - 1
        if last:
            if f.kind == "block":
                inner = ", ".join(sorted({g.name for g in f.fields})) or "nothing"
                raise SpecError(f"--set {path}: {'.'.join(where)} is a block; set one of its "
                                f"fields: {inner}")
            if f.kind == "list":
                raise SpecError(f"--set {path}: {'.'.join(where)} is a list; gpusched sets "
                                "single values only (edit the spec file for lists)")
            return f
        if f.kind != "block":
            raise SpecError(f"--set {path}: {'.'.join(where)} is a value, not a block")
        here = f.fields
    raise SpecError(f"--set {path}: empty path")  # pragma: no cover - _segments refuses it


def apply_overrides(text: str, overrides: dict[str, Any]) -> str:
    """The spec text with each ``dotted.path: value`` replaced; raises SpecError for a path
    the spec does not hold (naming the nearest fields) or a value of the wrong kind."""
    if not overrides:
        return text
    fields, _ = _parse(_tokens(text), 0, None)
    edits: dict[int, tuple[int, str]] = {}
    for path, value in overrides.items():
        if not isinstance(value, bool | int | float | str):
            raise SpecError(f"--set {path}: {value!r} is not a bool, number or string")
        f = _find(fields, path)
        edits[f.start] = (f.end, _render(path, f, value))
    out = []
    pos = 0
    for start in sorted(edits):
        end, new = edits[start]
        out.append(text[pos:start])
        out.append(new)
        pos = end
    out.append(text[pos:])
    return "".join(out)
