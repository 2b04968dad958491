"""The collection YAML: one declarative schema (pydantic), a bounded safe loader, errors that say where and how.

`CollectionModel` is the one statement of what a collection may hold; `sampler/collection.schema.json`
is generated from it (`write_json_schema()` rewrites it; a test checks it is current).
`read_collection(path)` reads a file no larger than `MAX_YAML_BYTES` with a safe loader that refuses
more than `MAX_ALIASES` aliases, a document that would expand to more than `MAX_NODES` nodes, and
a key written twice in one mapping, all before anything is expanded; then validates the document.
Every problem is a `CollectionError` naming the file, the experiment and the field path, with a hint.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any

import annotated_types
import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      field_validator, model_validator)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

#: a collection YAML larger than this is refused before it is parsed
MAX_YAML_BYTES = 16 << 20
#: YAML aliases (`*name`) allowed in one collection, counted while composing, before any expansion
MAX_ALIASES = 100
#: nodes the document may expand to once aliases are followed (a 1 KB alias bomb expands to billions)
MAX_NODES = 1_000_000
SCHEMA_FILE = Path(__file__).with_name("collection.schema.json")


class CollectionError(ValueError):
    """A collection YAML problem: `where` (file, experiment, field path), what is wrong, how to fix it."""

    def __init__(self, where: str, problem: str, hint: str = "") -> None:
        self.where, self.problem, self.hint = where, problem, hint
        super().__init__(f"{where}: {problem}" + (f"; {hint}" if hint else ""))


# ---------------------------------------------------------------------------------------------- the model
def _custom(kind: str, message: str, hint: str, at: tuple[Any, ...] = ()) -> PydanticCustomError:
    """A validation error with a fix (`hint`) and a position below the validated field (`at`)."""
    return PydanticCustomError(kind, message, {"hint": hint, "at": at})


def _path_of(parts: int, what: str, example: str) -> Any:
    """A string of `parts` '/'-separated names (surrounding '/' dropped), checked and stated in the schema."""

    def check(value: str) -> str:
        value = value.strip("/")
        if len(value.split("/")) != parts or not all(value.split("/")):
            raise _custom("path_form", f"{value!r} is not {what}", f"write it as ROW/COL{'/FOV' * (parts == 3)}, "
                                                                    f"e.g. {example}")
        return value

    pattern = "^/?" + "/".join(["[^/]+"] * parts) + "/?$"
    return Annotated[str, AfterValidator(check), Field(json_schema_extra={"pattern": pattern})]


NonEmpty = Annotated[str, annotated_types.MinLen(1)]
Well = _path_of(2, "a well", "B/3")
FovName = _path_of(3, "an FOV", "B/3/0")
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    """No coercion (true is not 1, 12 is not '12', a string is not a list) and no unknown keys."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class RemoteEntry(_Strict):
    """Bounds on remote (http, gcs, s3) reads (`sampler.kvstore.RemoteLimits`); unset keys keep the
    collection's value, else the default."""

    timeout_s: Positive | None = Field(None, description="seconds any one wait may take, retries included (default 30)")
    retries: Annotated[int, Field(ge=0)] | None = Field(None, description="retries of a transient failure, a whole "
                                                                          "number >= 0 (default 4)")
    retry_delay_s: Positive | None = Field(None, description="first delay between retries, seconds (default 0.5)")
    retry_max_delay_s: Positive | None = Field(None, description="longest delay between retries, seconds, >= "
                                                                 "retry_delay_s (default 4)")


class ChannelRef(_Strict):
    """The mapping form's long value: `{label: {name, wells}}`."""

    name: NonEmpty = Field(description="the zarr (OMERO) channel name")
    wells: list[Well] = Field([], description="the wells where this label is in that channel (default: all)")


class ChannelEntry(_Strict):
    """The reference's list form: `[{name, marker, wells}]`."""

    name: NonEmpty = Field(description="the zarr (OMERO) channel name")
    marker: str = Field("", description="the channel label (default: the zarr name)")
    wells: list[Well] = Field([], description="the wells where this marker is in that channel (default: all)")

    @property
    def label(self) -> str:
        return self.marker or self.name


def _channels_form(value: Any) -> str | None:
    return {dict: "mapping", list: "list"}.get(type(value))


def _source_form(value: Any) -> str:
    return "ref" if isinstance(value, dict) else "zarr-name"


ChannelMap = dict[NonEmpty, Annotated[Annotated[NonEmpty, Tag("zarr-name")] | Annotated[ChannelRef, Tag("ref")],
                                      Discriminator(_source_form)]]
Channels = Annotated[
    Annotated[ChannelMap, Tag("mapping")] | Annotated[list[ChannelEntry], Tag("list")],
    Discriminator(_channels_form, custom_error_type="channels_form",
                  custom_error_message="expected a mapping {label: zarr channel name} or a list [{name, marker}]"),
]


class ExperimentEntry(_Strict):
    """One experiment of a collection: a plate, its tracks, its channel map, its wells and its clock."""

    name: NonEmpty = Field(description="a unique name (quote it if it looks like a number or a date)")
    data_path: NonEmpty = Field(description="the HCS OME-Zarr plate: a path (relative to the YAML's folder) or "
                                            "a URL; ${datasets_root} is replaced")
    tracks_path: NonEmpty = Field(description="the folder holding {row}/{col}/{fov}/*.csv, one CSV per FOV")
    channels: Channels = Field([], description="{label: zarr channel name} (or {label: {name, wells}}), or the "
                                               "reference's [{name, marker, wells}]")
    channel_names: list[NonEmpty] = Field([], description="the reference's list of the plate's zarr channels; "
                                                          "without 'channels' each is its own label")
    perturbation_wells: dict[NonEmpty, Annotated[list[Well], annotated_types.MinLen(1)]] = Field(
        min_length=1, description="{perturbation: [wells]}, e.g. {mock: [B/4], infected: [B/2, C/4]}")
    interval_minutes: Positive = Field(description="minutes between frames, a number > 0 (e.g. 30)")
    start_hpi: Finite = Field(0.0, description="hours post perturbation at t = 0, a number")
    include_wells: list[Well] | None = Field(None, description="keep only these wells (e.g. [B/3])")
    exclude_wells: list[Well] | None = Field(None, description="drop these wells (e.g. [B/3])")
    include_fovs: list[FovName] | None = Field(None, description="keep only these FOVs (e.g. [B/3/0])")
    exclude_fovs: list[FovName] | None = Field(None, description="drop these FOVs (e.g. [B/3/0])")
    pixel_size_xy_um: Positive | None = Field(None, description="microns per pixel in Y and X, a number > 0")
    pixel_size_z_um: Positive | None = Field(None, description="microns per Z slice, a number > 0")
    remote: RemoteEntry | None = Field(None, description="bounds on this experiment's remote reads (over the "
                                                         "collection's)")
    # the reference's bookkeeping: accepted, checked for type, not used here
    marker: str = Field("", description="the reference's deprecated experiment-level marker (not used)")
    organelle: str = Field("", description="bookkeeping (not used)")
    microscope: str = Field("", description="bookkeeping (not used)")
    date: str | datetime.date = Field("", description="bookkeeping (not used)")
    moi: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(0.0, description="bookkeeping (not used)")

    @field_validator("channels")
    @classmethod
    def _one_label_per_channel(cls, channels: dict[str, str | ChannelRef] | list[ChannelEntry]) -> Any:
        """A label given twice, or one zarr channel read by two labels in the same well, is an error."""
        if isinstance(channels, list):
            entries = [((i,), e.label, e.name, e.wells) for i, e in enumerate(channels)]
        else:
            entries = [((label,), label, *((src, []) if isinstance(src, str) else (src.name, src.wells)))
                       for label, src in channels.items()]
        for k, (at, label, name, wells) in enumerate(entries):
            for _, other, other_name, other_wells in entries[:k]:
                if label == other:
                    raise _custom("duplicate", f"label '{label}' is given twice",
                                  "give each channel its own marker", at)
                if name == other_name and (not wells or not other_wells or set(wells) & set(other_wells)):
                    raise _custom("duplicate", f"labels '{other}' and '{label}' both read zarr channel '{name}'",
                                  "map each zarr channel to one label (or give them disjoint 'wells')", at)
        return channels

    @field_validator("perturbation_wells")
    @classmethod
    def _one_perturbation_per_well(cls, wells: dict[str, list[str]]) -> dict[str, list[str]]:
        seen: dict[str, str] = {}
        for label, listed in wells.items():
            for i, well in enumerate(listed):
                if well in seen:
                    raise _custom("duplicate", f"well {well} is listed under '{seen[well]}' and '{label}'",
                                  "a well has one perturbation: keep it under one", (label, i))
                seen[well] = label
        return wells

    def sources(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """{label: (zarr channel name, wells)}; with only `channel_names`, each name is its own label."""
        if not self.channels:
            return {name: (name, ()) for name in self.channel_names}
        if isinstance(self.channels, list):
            return {e.label: (e.name, tuple(e.wells)) for e in self.channels}
        return {label: (src, ()) if isinstance(src, str) else (src.name, tuple(src.wells))
                for label, src in self.channels.items()}

    @model_validator(mode="after")
    def _channels_given(self) -> "ExperimentEntry":
        """At least one channel; with `channel_names`, every channel read is one of them."""
        if not self.sources():
            raise _custom("missing", "no channels given",
                          "add channels: {label: zarr channel name} (or the reference's channel_names)", ("channels",))
        if self.channel_names:
            for label, (name, _) in self.sources().items():
                if name not in self.channel_names:
                    raise _custom("unknown_channel", f"label '{label}' reads '{name}', which is not in channel_names "
                                                     f"{self.channel_names}", "fix the name or channel_names",
                                  ("channels",))
        return self


class CollectionModel(_Strict):
    """A collection: experiments and the canonical channel labels (the channel order of every batch)."""

    model_config = ConfigDict(title="dynaclr-dali collection", json_schema_extra={
        "$comment": "generated from sampler.collection.CollectionModel by sampler.collection.write_json_schema()"})

    experiments: list[ExperimentEntry] = Field(min_length=1, description="the experiments, at least one")
    channels: list[NonEmpty] | None = Field(None, description="the canonical channel labels in batch order "
                                                              "(default: their order of first appearance)")
    datasets_root: str | None = Field(None, description="substituted for ${datasets_root} in data_path and "
                                                        "tracks_path")
    name: str = Field("", description="the collection's name")
    description: str = Field("", description="free text")
    remote: RemoteEntry | None = Field(None, description="bounds on remote reads: timeout_s, retries, retry_delay_s, "
                                                         "retry_max_delay_s")
    provenance: dict[str, Any] | None = Field(None, description="the reference's provenance record (not used)")
    fov_records: list[Any] = Field([], description="the reference's per-FOV records (not used)")

    @field_validator("channels")
    @classmethod
    def _labels_once(cls, labels: list[str] | None) -> list[str] | None:
        for i, label in enumerate(labels or []):
            if label in labels[:i]:
                raise _custom("duplicate", f"label '{label}' is listed twice", "list each label once", (i,))
        return labels


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a collection YAML, as shipped in `sampler/collection.schema.json`."""
    return CollectionModel.model_json_schema()


# ---------------------------------------------------------------------------------------------- the loader
class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that counts aliases while composing and refuses a key written twice in one mapping."""

    def __init__(self, stream: bytes, source: str) -> None:
        super().__init__(stream)
        self.source, self.aliases = source, 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise CollectionError(f"{self.source}: line {mark.line + 1}", f"more than {MAX_ALIASES} YAML aliases",
                                      "a collection needs few anchors (&name) and aliases (*name): write the "
                                      "values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise CollectionError(f"{self.source}: line {key_node.start_mark.line + 1}",
                                          f"key '{key}' is given twice in one mapping",
                                          "keep one (YAML would silently keep the last)")
                seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_nodes(root: yaml.Node) -> int:
    """How many nodes `root` stands for once every alias is followed (linear in the composed graph)."""
    memo: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) not in memo:
            if isinstance(node, yaml.MappingNode):
                memo[id(node)] = 1 + sum(size(k) + size(v) for k, v in node.value)
            elif isinstance(node, yaml.SequenceNode):
                memo[id(node)] = 1 + sum(size(v) for v in node.value)
            else:
                memo[id(node)] = 1
        return memo[id(node)]

    return size(root)


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """The YAML document at `path`, read safely within the size, alias and expansion limits."""
    source = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read(MAX_YAML_BYTES + 1)
    if len(raw) > MAX_YAML_BYTES:
        raise CollectionError(source, f"larger than {MAX_YAML_BYTES:,} bytes",
                              "a collection YAML lists experiments, not data: is this the right file?")
    loader = _BoundedLoader(raw, source)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        nodes = _expanded_nodes(node)
        if nodes > MAX_NODES:
            raise CollectionError(source, f"its aliases expand to {nodes:,} nodes, more than {MAX_NODES:,}",
                                  "write the values out instead of nesting aliases")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise CollectionError(source, f"not valid YAML{where}: {problem}",
                              "fix the syntax (indentation, a ':' after each key, quotes around values with ':' or "
                              "'#'); only plain YAML is read (no !!python tags)") from err
    except RecursionError:
        raise CollectionError(source, "nested too deeply", "a collection is a few levels deep") from None
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------------------------- errors
_TAGS = {"mapping", "list", "zarr-name", "ref"}  # the discriminators' tags, in pydantic's error locations


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside a field's annotation (through unions, lists, dicts, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _locate(source: str, doc: Any, loc: tuple[Any, ...]) -> tuple[str, FieldInfo | None, str]:
    """'file: experiments[1] (name 'b').channels.p', the FieldInfo of the last field named, and its name."""
    text, node, models, info, field = source + ":", doc, [CollectionModel], None, ""
    for item in loc:
        known = [m.model_fields[item] for m in models if isinstance(item, str) and item in m.model_fields]
        if isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            node = node[item]
            name = node.get("name") if isinstance(node, dict) and text.endswith(" experiments") else None
            text += f"[{item}]" + (f" (name {name!r})" if isinstance(name, str) else "")
            continue
        if item == "[key]":
            text += " (the key)"
            continue
        if isinstance(node, dict) and item in node:
            node = node[item]
        elif item in _TAGS or not known:
            continue
        else:
            node = None
        shown = item if isinstance(item, str) and re.fullmatch(r"[\w-]+", item) else repr(item)
        text += ("." if not text.endswith(":") else " ") + str(shown)
        if known:
            info, field = known[0], item
            models = [m for k in known for m in _models_in(k.annotation)]
    return text, info, field


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, str):
        return f"the string {value!r}"
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip().removesuffix("...").strip()
    return text if len(text) <= 60 else text[:57] + "..."


def _constraints(annotation: Any) -> list[Any]:
    """The annotated_types constraints inside an annotation (through unions and Annotated)."""
    found = list(getattr(annotation, "metadata", []))
    return found + [c for arg in typing.get_args(annotation) for c in _constraints(arg)]


def _expected_number(info: FieldInfo | None) -> str:
    found = _constraints(info) + _constraints(info.annotation) if info is not None else []
    bounds = [f"> {c.gt}" for c in found if isinstance(c, annotated_types.Gt)]
    bounds += [f">= {c.ge}" for c in found if isinstance(c, annotated_types.Ge)]
    return "a number" + (" " + bounds[0] if bounds else "")


def _suggest(key: Any, fields: list[str]) -> str:
    close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else f"remove it; known fields: {', '.join(fields)}"


def _unknown_key_hint(key: Any, loc: tuple[Any, ...]) -> str:
    top, exp = list(CollectionModel.model_fields), list(ExperimentEntry.model_fields)
    if len(loc) == 1:
        if key in exp:
            return f"'{key}' belongs to each experiment: move it under experiments[...]"
        return _suggest(key, top)
    if len(loc) == 3 and loc[0] == "experiments":
        if key in top:
            return f"'{key}' is a collection-level field: move it to the top of the file"
        return _suggest(key, exp)
    return _suggest(key, sorted({f for m in _models_at(loc[:-1]) for f in m.model_fields}))


def _models_at(loc: tuple[Any, ...]) -> list[type[BaseModel]]:
    """The models a validation location can name: the field names along it, from the collection down."""
    models: list[type[BaseModel]] = [CollectionModel]
    for item in loc:
        inner = [m for model in models if isinstance(item, str) and item in model.model_fields
                 for m in _models_in(model.model_fields[item].annotation)]
        models = inner or models  # list indices, dict keys and union tags stay at the same models
    return models


def _problem(error: dict[str, Any], info: FieldInfo | None, field: str) -> tuple[str, str]:
    """(what is wrong, how to fix it) for one pydantic error."""
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    about = f"{field}: {info.description}" if info is not None and info.description else ""
    if "hint" in ctx:
        return error["msg"], ctx["hint"]
    if kind == "missing":
        return "missing", f"add {about}" if about else "add it"
    if kind == "extra_forbidden":
        return "unknown field", _unknown_key_hint(error["loc"][-1], error["loc"])
    if kind in ("float_type", "float_parsing", "int_type", "greater_than", "greater_than_equal", "finite_number"):
        expected = "a finite number" if kind == "finite_number" else _expected_number(info)
        return f"expected {expected}, got {_show(value)}", "write a number without quotes" if isinstance(value, str) else about
    if kind == "string_type":
        return f"expected a string, got {_show(value)}", f"quote it: '{value}'" if isinstance(value, (int, float)) else about
    if kind in ("too_short", "string_too_short"):
        return "must not be empty", about
    if kind == "list_type":
        fix = f"write a list: [{value}]" if isinstance(value, str) else about
        return f"expected a list, got {_show(value)}", fix
    if kind in ("dict_type", "model_type", "channels_form"):
        wanted = error["msg"] if kind == "channels_form" else "expected a mapping"
        return f"{wanted}, got {_show(value)}", about
    return f"{error['msg'][0].lower()}{error['msg'][1:]}, got {_show(value)}", about


def _first_error(source: str, doc: Any, err: ValidationError) -> CollectionError:
    errors = err.errors(include_url=False)
    error = min(errors, key=lambda e: e["type"] != "extra_forbidden")  # a misspelt key explains a missing one
    loc = tuple(error["loc"]) + tuple((error.get("ctx") or {}).get("at", ()))
    where, info, field = _locate(source, doc, loc)
    problem, hint = _problem(error, info, field)
    more = len(errors) - 1
    return CollectionError(where.rstrip(":") if loc else f"{source}: the collection", problem,
                           hint + (f" ({more} more problem{'s' * (more > 1)} after this one)" if more else ""))


def read_collection(path: str | os.PathLike[str]) -> CollectionModel:
    """A validated collection; the first problem found is a `CollectionError` naming file, experiment and field."""
    source = os.fspath(path)
    doc = load_yaml(path)
    if not isinstance(doc, dict):
        raise CollectionError(source, f"expected a mapping with an 'experiments:' list, got {_show(doc)}",
                              "see the README's collection YAML")
    try:
        return CollectionModel.model_validate(doc)
    except ValidationError as err:
        raise _first_error(source, doc, err) from None


def write_json_schema(path: str | os.PathLike[str] = SCHEMA_FILE) -> None:
    """Write `json_schema()` to `path` (by default the packaged file a test compares with the model)."""
    Path(path).write_text(json.dumps(json_schema(), indent=1) + "\n")
