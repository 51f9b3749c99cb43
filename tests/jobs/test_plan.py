"""Reading a models file: defaults, names, keys that change exactly when a job's output would,
and refusals that name the bad field."""

from __future__ import annotations

import json

import pytest

from kvfuse.errors import KvfuseError
from kvfuse.jobs.job import optimize_arguments
from kvfuse.jobs.plan import load_jobs


def write(tmp_path, document) -> object:
    path = tmp_path / "models.json"
    path.write_text(json.dumps(document))
    return path


def test_defaults_apply_and_entries_override(tmp_path):
    """Each model gets the shared defaults, its own options win, and relative sources are
    read from the models file's directory."""
    (tmp_path / "a").mkdir()
    jobs = load_jobs(
        write(
            tmp_path,
            {
                "defaults": {"max_context": 512, "target": "onnx"},
                "models": ["default", {"source": "a", "target": "ort", "name": "a-ort"}],
            },
        )
    )
    assert [job.name for job in jobs] == ["default", "a-ort"]
    assert jobs[0].source == "default" and jobs[1].source == str(tmp_path / "a")
    assert jobs[0].options["target"] == "onnx" and jobs[1].options["target"] == "ort"
    assert jobs[0].options["max_context"] == jobs[1].options["max_context"] == 512
    assert jobs[0].options["exporter"] == "optimum"  # kvfuse's own default


def test_key_follows_source_bytes_and_options_not_resources(tmp_path):
    """A job is redone when its source's files or its options change, not when only the
    resources it asks Ray for do."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")

    def key(**options):
        return load_jobs(write(tmp_path, {"models": [{"source": "m", **options}]}))[0].key

    first = key()
    assert key() == first
    assert key(resources={"cpus": 4}) == first
    assert key(max_context=128) != first
    (model / "config.json").write_text('{"a": 1}')
    assert key() != first


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"defaults": {}}, "$: 'models' is a required property"),
        ({"models": []}, "models: [] should be non-empty"),
        ({"models": ["x"], "defaults": {"targt": "ort"}}, "defaults: Unevaluated properties"),
        ({"models": [{"source": "x", "exporter": "tf"}]}, "models[0].exporter: 'tf' is not one of"),
        ({"models": [{"source": "x", "colour": 1}]}, "models[0]: Unevaluated properties"),
        ({"models": ["a", "b/a"]}, "models[1]: name 'a' is also models[0]'s"),
    ],
)
def test_malformed_files_name_the_field(tmp_path, document, message):
    """Schema and name clashes are refused with the JSON path of the offending field."""
    with pytest.raises(KvfuseError) as error:
        load_jobs(write(tmp_path, document))
    assert message in str(error.value)


def test_option_optimize_does_not_take_is_refused_by_name(tmp_path):
    """An option kvfuse.optimize has no parameter for fails the job, naming it."""
    options = load_jobs(write(tmp_path, {"models": ["default"]}))[0].options
    with pytest.raises(KvfuseError, match="no option 'colour'"):
        optimize_arguments({**options, "optimize_options": {"colour": "blue"}})
