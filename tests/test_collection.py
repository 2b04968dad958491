"""The collection schema at load: types, ranges, unknown keys, empty selections, duplicates, YAML limits.

Every error starts with the YAML file, the experiment and the field path, and says how to fix it.
"""

from __future__ import annotations

import datetime
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from builders import make_experiment, track_rows, tracks_table, write_collection
from dali_pipeline.cli import main
from sampler import CollectionError, ExperimentRegistry
from sampler import collection as schema

TRACKS = {f: tracks_table(track_rows(0, range(4), y=8.0, x=8.0)) for f in ("A/1/0", "B/2/0")}


@pytest.fixture
def exp(tmp_path) -> dict:
    """A valid experiment 'a' (wells A/1 and B/2, one FOV each, zarr channels P and G)."""
    return make_experiment(tmp_path, "a", TRACKS, ["P", "G"], {"p": "P"}, shape=(1, 16, 16), n_t=4)


def error_of(tmp_path: Path, doc: dict | str) -> tuple[Path, str]:
    """(the YAML's path, the error of loading it): `doc` is written as YAML, or as text when a string."""
    path = tmp_path / "c.yml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(CollectionError) as raised:
        ExperimentRegistry.from_yaml(path)
    return path, str(raised.value)


def exp_error(tmp_path: Path, exp: dict, **change) -> str:
    """The error of a collection holding `exp` changed by `change`, after 'FILE: experiments[0] (name ...).'."""
    path, message = error_of(tmp_path, {"experiments": [{**exp, **change}]})
    name = change.get("name", exp["name"])
    where = f"{path}: experiments[0]" + (f" (name {name!r})" if isinstance(name, str) else "")
    assert message.startswith(where + "."), message
    return message[len(where) + 1:]


# ---------------------------------------------------------------------------------------------- types
@pytest.mark.parametrize("field, value, expected", [
    ("exclude_fovs", "A/1/0", "exclude_fovs: expected a list, got the string 'A/1/0'; write a list: [A/1/0]"),
    ("include_wells", "B/2", "include_wells: expected a list, got the string 'B/2'; write a list: [B/2]"),
    ("perturbation_wells", {"mock": "A/1"},
     "perturbation_wells.mock: expected a list, got the string 'A/1'; write a list: [A/1]"),
])
def test_a_string_where_a_list_belongs_is_refused_not_split_into_characters(tmp_path, exp, field, value, expected):
    assert exp_error(tmp_path, exp, **{field: value}) == expected


@pytest.mark.parametrize("change, expected", [
    ({"interval_minutes": True}, "interval_minutes: expected a number > 0, got true; interval_minutes: minutes "
                                 "between frames, a number > 0 (e.g. 30)"),
    ({"start_hpi": "abc"}, "start_hpi: expected a number, got the string 'abc'; write a number without quotes"),
    ({"pixel_size_xy_um": False}, "pixel_size_xy_um: expected a number > 0, got false"),
    ({"name": 12}, "name: expected a string, got 12; quote it: '12'"),
    ({"channels": {"p": 5}}, "channels.p: expected a string, got 5; quote it: '5'"),
    ({"channels": "P"}, "channels: expected a mapping {label: zarr channel name} or a list [{name, marker}], "
                        "got the string 'P'"),
    ({"perturbation_wells": {"mock": [1]}}, "perturbation_wells.mock[0]: expected a string, got 1"),
    ({"exclude_fovs": ["A/1"]}, "exclude_fovs[0]: 'A/1' is not an FOV; write it as ROW/COL/FOV, e.g. B/3/0"),
])
def test_wrong_types_are_not_coerced(tmp_path, exp, change, expected):
    assert exp_error(tmp_path, exp, **change).startswith(expected)


# ---------------------------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("change, expected", [
    ({"interval_minutes": 0}, "interval_minutes: expected a number > 0, got 0"),
    ({"interval_minutes": -5.5}, "interval_minutes: expected a number > 0, got -5.5"),
    ({"interval_minutes": float("inf")}, "interval_minutes: expected a finite number, got .inf"),
    ({"start_hpi": float("nan")}, "start_hpi: expected a finite number, got .nan"),
    ({"pixel_size_z_um": -1}, "pixel_size_z_um: expected a number > 0, got -1"),
    ({"moi": -0.5}, "moi: expected a number >= 0, got -0.5"),
    ({"perturbation_wells": {}}, "perturbation_wells: must not be empty; perturbation_wells: {perturbation: "),
])
def test_numbers_out_of_range(tmp_path, exp, change, expected):
    assert exp_error(tmp_path, exp, **change).startswith(expected)


# ---------------------------------------------------------------------------------------------- unknown keys
def test_unknown_keys_are_errors_with_the_closest_field(tmp_path, exp):
    typo = {k if k != "interval_minutes" else "interval_minute": v for k, v in exp.items()}
    assert exp_error(tmp_path, typo) == "interval_minute: unknown field; did you mean 'interval_minutes'? " \
                                        "(1 more problem after this one)"
    assert exp_error(tmp_path, exp, channels=[{"name": "P", "markr": "p"}]) == \
        "channels[0].markr: unknown field; did you mean 'marker'?"
    assert exp_error(tmp_path, exp, datasets_root="/x") == \
        "datasets_root: unknown field; 'datasets_root' is a collection-level field: move it to the top of the file"
    path, message = error_of(tmp_path, {"source_channels": ["p"], "experiments": [exp]})
    assert message == f"{path}: source_channels: unknown field; did you mean 'channels'?"
    path, message = error_of(tmp_path, {"interval_minutes": 30, "experiments": [exp]})
    assert message == (f"{path}: interval_minutes: unknown field; 'interval_minutes' belongs to each experiment: "
                       "move it under experiments[...]")


# ---------------------------------------------------------------------------------------------- selections
@pytest.mark.parametrize("change, expected", [
    ({"exclude_fovs": ["A/1/0", "B/2/0"]}, "exclude_fovs: leaves no FOV to read"),
    ({"exclude_wells": ["A/1", "B/2"]}, "exclude_wells: leaves no FOV to read"),
    ({"include_wells": ["A/1"], "perturbation_wells": {"mock": ["B/2"]}}, "include_wells: leaves no FOV to read"),
    ({"include_fovs": ["A/1/7"]}, "include_fovs: ['A/1/7'] is not in the plate"),
    ({"exclude_fovs": ["B/2/1"]}, "exclude_fovs: ['B/2/1'] is not in the plate"),
    ({"perturbation_wells": {"mock": ["A/1"], "drug": ["C/3"]}}, "perturbation_wells.drug: ['C/3'] is not in the plate"),
])
def test_a_selection_that_matches_nothing_is_an_error(tmp_path, exp, change, expected):
    message = exp_error(tmp_path, exp, **change)
    assert message.startswith(expected), message
    assert "widen them" in message or "did you mean" in message or "there: ['A/1', 'B/2']" in message


def test_the_selection_that_is_left_is_read(tmp_path, exp):
    path = write_collection(tmp_path, [dict(exp, exclude_fovs=["/A/1/0/"], include_wells=["A/1", "B/2"])])
    assert ExperimentRegistry.from_yaml(path).selected_fovs("a") == ["B/2/0"]


# ---------------------------------------------------------------------------------------------- duplicates
def test_duplicate_labels_and_two_labels_on_one_zarr_channel(tmp_path, exp):
    assert exp_error(tmp_path, exp, channels={"p": "P", "q": "P"}) == (
        "channels.q: labels 'p' and 'q' both read zarr channel 'P'; map each zarr channel to one label (or give "
        "them disjoint 'wells')")
    assert exp_error(tmp_path, exp, channels=[{"name": "P", "marker": "p"}, {"name": "G", "marker": "p"}]) == \
        "channels[1]: label 'p' is given twice; give each channel its own marker"
    assert exp_error(tmp_path, exp, channels=[{"name": "P", "marker": "p", "wells": ["A/1"]},
                                              {"name": "P", "marker": "q", "wells": ["A/1", "B/2"]}]).startswith(
        "channels[1]: labels 'p' and 'q' both read zarr channel 'P'")
    assert exp_error(tmp_path, exp, perturbation_wells={"mock": ["A/1"], "drug": ["B/2", "A/1"]}) == \
        "perturbation_wells.drug[1]: well A/1 is listed under 'mock' and 'drug'; a well has one perturbation: keep " \
        "it under one"
    path, message = error_of(tmp_path, {"channels": ["p", "p"], "experiments": [exp]})
    assert message == f"{path}: channels[1]: label 'p' is listed twice; list each label once"
    # a key written twice is refused before YAML keeps the last one
    text = yaml.safe_dump({"experiments": [exp]}).replace("channels:\n    p: P", "channels:\n    p: P\n    p: G")
    path, message = error_of(tmp_path, text)
    line = text.splitlines().index("    p: G") + 1
    assert message == f"{path}: line {line}: key 'p' is given twice in one mapping; keep one (YAML would silently " \
                      "keep the last)"


def test_one_zarr_channel_under_two_labels_in_disjoint_wells_loads(tmp_path, exp):
    channels = [{"name": "P", "marker": "p", "wells": ["A/1"]}, {"name": "P", "marker": "q", "wells": ["B/2"]}]
    registry = ExperimentRegistry.from_yaml(write_collection(tmp_path, [dict(exp, channels=channels)]))
    assert registry.labels == ["p", "q"] and registry.channel_maps["a"] == {0: 0, 1: 0}
    assert registry["a"].channels["q"].wells == ("B/2",)


# ---------------------------------------------------------------------------------------------- YAML limits
def _alias_bomb(levels: int, width: int) -> str:
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\nexperiments: []\n"


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    bomb = _alias_bomb(9, 9)  # 72 aliases, 9^9 = 387 million strings once expanded
    assert len(bomb) < 1024
    path, message = error_of(tmp_path, bomb)
    assert re.match(re.escape(f"{path}: its aliases expand to ") + r"[\d,]{11} nodes, more than 1,000,000; write the values "
                    "out", message), message
    path, message = error_of(tmp_path, _alias_bomb(11, 11))  # 110 aliases: the 101st is on line 11
    assert message.startswith(f"{path}: line 11: more than 100 YAML aliases; ")


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path, exp, monkeypatch):
    path = write_collection(tmp_path, [exp])
    monkeypatch.setattr(schema, "MAX_YAML_BYTES", path.stat().st_size - 1)
    with pytest.raises(CollectionError, match=re.escape(f"{path}: larger than {path.stat().st_size - 1:,} bytes; ")):
        ExperimentRegistry.from_yaml(path)
    monkeypatch.setattr(schema, "MAX_YAML_BYTES", path.stat().st_size)
    assert ExperimentRegistry.from_yaml(path).names == ["a"]


def test_a_few_anchors_and_merge_keys_still_load(tmp_path, exp):
    text = "experiments:\n  - &first " + json.dumps(exp) + "\n  - {<<: *first, name: b, interval_minutes: 15}\n"
    (tmp_path / "ok.yml").write_text(text)
    registry = ExperimentRegistry.from_yaml(tmp_path / "ok.yml")
    assert registry.names == ["a", "b"] and registry["b"].interval_minutes == 15
    assert registry["b"].channels == registry["a"].channels and registry["b"].data_path == exp["data_path"]
    # anchors kept under a key of their own: an unknown key, with the known ones listed
    path, message = error_of(tmp_path, "defaults: &d {interval_minutes: 30}\n" + text)
    assert message == f"{path}: defaults: unknown field; remove it; known fields: experiments, channels, " \
                      "datasets_root, name, description, remote, provenance, fov_records"


@pytest.mark.parametrize("text, expected", [
    ("", "expected a mapping with an 'experiments:' list, got null"),
    ("- a\n- b\n", "expected a mapping with an 'experiments:' list, got [a, b]"),
    ("name: x\n", "experiments: missing; add experiments: the experiments, at least one"),
    ("[" * 5000, "nested too deeply"),
])
def test_not_a_collection(tmp_path, text, expected):
    path, message = error_of(tmp_path, text)
    assert message.startswith(f"{path}: {expected}"), message


# ---------------------------------------------------------------------------------------------- both formats
def test_the_references_format_and_bookkeeping_fields_load(tmp_path, exp):
    ref = dict(exp, channels=[], channel_names=["P", "G"], organelle="ER", microscope="mantis",
               date=datetime.date(2025, 1, 28), moi=0.5, marker="SEC61B")
    path = tmp_path / "ref.yml"
    path.write_text(yaml.safe_dump({"name": "ref", "description": "d", "datasets_root": None,
                                    "provenance": {"record_ids": [1, 2], "created_by": "me"}, "fov_records": [{}],
                                    "experiments": [ref]}).replace("'2025-01-28'", "2025-01-28"))
    assert "date: 2025-01-28\n" in path.read_text()
    registry = ExperimentRegistry.from_yaml(path)
    assert registry.labels == ["P", "G"] and registry.channel_maps["a"] == {0: 0, 1: 1}
    assert exp_error(tmp_path, exp, channels=[{"name": "R", "marker": "r"}], channel_names=["P", "G"]) == \
        "channels: label 'r' reads 'R', which is not in channel_names ['P', 'G']; fix the name or channel_names"
    assert exp_error(tmp_path, exp, channels={}) == \
        "channels: no channels given; add channels: {label: zarr channel name} (or the reference's channel_names)"


# ---------------------------------------------------------------------------------------------- schema file, CLI
def test_the_shipped_json_schema_is_the_models():
    assert json.loads(schema.SCHEMA_FILE.read_text()) == schema.CollectionModel.model_json_schema(), \
        "regenerate it: python -c 'import sampler.collection as c; c.write_json_schema()'"
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "collection.schema.json" in pyproject["tool"]["setuptools"]["package-data"]["sampler"]
    assert any(d.startswith("pydantic>=2") for d in pyproject["project"]["dependencies"])


def test_the_cli_prints_the_librarys_error_as_it_is(tmp_path, exp, capsys):
    path = write_collection(tmp_path, [dict(exp, interval_minutes=True)])
    with pytest.raises(CollectionError) as raised:
        ExperimentRegistry.from_yaml(path)
    assert main(["index", str(path)]) == 2
    assert capsys.readouterr().err == f"dynaclr-dali index: error: {raised.value}\n"
