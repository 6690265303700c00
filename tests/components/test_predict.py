"""gptpipe predict's input: a missing file is one line that names the --input argument, whatever its format."""

from pathlib import Path

import pytest

from components.errors import InputError
from components.predict import read_input


@pytest.mark.parametrize("name", ["texts.txt", "texts.csv", "texts.parquet"])
def test_a_missing_input_names_the_input_argument(tmp_path: Path, name: str):
    with pytest.raises(InputError, match=f"{name}: file not found; pass an existing file to --input"):
        read_input(tmp_path / name, "text")
