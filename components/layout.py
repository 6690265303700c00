"""Where the stages write: the paths dvc.yaml names, in one place for the stages' argument defaults and for the
code that reads them after the DAG (register, the flow's artifacts). tests/test_dvc_deps.py checks dvc.yaml
against it."""

from pathlib import Path

SOURCES = Path("data/sources.json")
FOUNDATION_SOURCE = Path("data/foundation.json")
PREPARED = Path("data/prepared")
TOKENS = Path("data/tokens")
FOUNDATION = Path("models/foundation")  # shipped in git, not a stage output
PRETRAINED = Path("models/pretrained")
CLASSIFIER = Path("models/classifier")
REPORTS = Path("reports")
DATA_REPORT = REPORTS / "data.json"
LENGTHS_PLOT = REPORTS / "data_lengths.png"
METRICS = REPORTS / "metrics.json"
LABEL_EFFICIENCY = REPORTS / "label_efficiency.json"
LABEL_EFFICIENCY_PLOT = REPORTS / "label_efficiency.png"
CONFUSION_PLOT = REPORTS / "confusion_matrix.png"
MISTAKES = REPORTS / "mistakes.md"
MODEL_CARD = REPORTS / "model_card.md"
CURVES = REPORTS / "curves"  # one DVCLive folder per training stage
PRETRAIN_CURVES = CURVES / "pretrain"
FINETUNE_CURVES = CURVES / "finetune"
CURVES_PLOT = REPORTS / "training_curves.png"
