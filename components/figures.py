"""Figures the stages write: matplotlib without a display, saved in one rename."""

import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # stages run headless
import matplotlib.pyplot as plt

from components.atomic import write_bytes_atomic


def save_figure(fig, path: Path) -> None:
    with tempfile.NamedTemporaryFile(suffix=".png") as staging:
        fig.savefig(staging.name, dpi=110)
        write_bytes_atomic(path, Path(staging.name).read_bytes())
    plt.close(fig)
