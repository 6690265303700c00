import pytest

from components.errors import InputError
from components.params import apply_overrides, load_params, read_raw
from flows.params_file import changed_leaves


def test_params_yaml_holds_every_key_of_the_schema():
    """A run writes missing keys into params.yaml (DVC needs them), which would leave a fresh clone dirty."""
    params = load_params("params.yaml")
    assert params.model.d_model % params.model.n_head == 0
    assert changed_leaves(read_raw("params.yaml"), params.model_dump(mode="json")) == []


def test_override_keeps_yaml_types():
    raw = apply_overrides({}, ["pretrain.max_steps=12", "evaluate.baselines=[tfidf_logreg]", "data.test.path="])
    assert raw == {"pretrain": {"max_steps": 12}, "evaluate": {"baselines": ["tfidf_logreg"]},
                   "data": {"test": {"path": None}}}


def test_every_problem_is_reported_in_one_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model: {n_head: 3}\npretrain: {max_steps: many}\nunknown_section: 1\n")
    with pytest.raises(InputError) as error:
        load_params(path)
    message = str(error.value)
    assert str(path) in message
    assert "n_head" in message and "pretrain.max_steps" in message and "unknown_section" in message


@pytest.mark.parametrize("pair", ["pretrain.max_steps", "=3", "seed.x=1"])
def test_malformed_override_names_the_pair(pair):
    with pytest.raises(InputError, match="--set"):
        apply_overrides({"seed": 1}, [pair])


def test_contradictory_combination_rejected():
    with pytest.raises(InputError, match="warmup_steps"):
        load_params("params.yaml", ["pretrain.warmup_steps=50", "pretrain.max_steps=10"])
