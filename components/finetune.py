"""Finetune: a classification head on the pre-trained GPT, trained on the labeled train split, best by val.

    python -m components.finetune --prepared data/prepared --pretrained models/pretrained --out models/classifier
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import lightning as L
import polars as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_model
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from components.atomic import atomic_dir
from components.errors import exit_on_input_error
from components.inference import encode, load_backbone
from components.model import GPT, Classifier
from components.params import FinetuneParams, Params, load_params
from components.training import make_trainer, warmup_cosine


class TextClassifier(L.LightningModule):
    def __init__(self, classifier: Classifier, cfg: FinetuneParams, total_steps: int):
        super().__init__()
        self.classifier = classifier
        self.cfg = cfg
        self.total_steps = total_steps
        classes = classifier.head.out_features
        self.val_f1 = MulticlassF1Score(classes, average="macro")
        self.val_accuracy = MulticlassAccuracy(classes, average="micro")

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, mask, labels = batch
        loss = F.cross_entropy(self.classifier(ids, mask), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        ids, mask, labels = batch
        predictions = self.classifier(ids, mask).argmax(dim=-1)
        self.val_f1.update(predictions, labels)
        self.val_accuracy.update(predictions, labels)
        self.log_dict({"val_macro_f1": self.val_f1, "val_accuracy": self.val_accuracy}, prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.classifier.parameters(), lr=self.cfg.learning_rate,
                                      weight_decay=self.cfg.weight_decay, fused=self.device.type == "cuda")
        warmup = int(self.cfg.warmup_fraction * self.total_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, self.total_steps, 0.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def labeled_loader(frame: pl.DataFrame, tokenizer: Tokenizer, labels: list[str], context: int,
                   batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    ids, mask = encode(tokenizer, frame["text"].to_list(), context)
    targets = torch.tensor([labels.index(label) for label in frame["label"].to_list()])
    return DataLoader(TensorDataset(ids, mask, targets), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def finetune(params: Params, prepared: Path, backbone: GPT, tokenizer: Tokenizer, work_dir: Path,
             train: pl.DataFrame | None = None) -> tuple[Classifier, dict]:
    """Fine-tune `backbone` (pre-trained, or freshly initialised for the scratch baseline) on `train` (the
    train split by default); returns the classifier at its best validation macro-F1."""
    # setup
    L.seed_everything(params.seed, workers=True, verbose=False)
    cfg = params.finetune
    labels = json.loads((prepared / "labels.json").read_text())
    train = pl.read_parquet(prepared / "train.parquet") if train is None else train
    context = backbone.config.context_length
    train_loader = labeled_loader(train, tokenizer, labels, context, cfg.batch_size, True, params.seed)
    val_loader = labeled_loader(pl.read_parquet(prepared / "val.parquet"), tokenizer, labels, context,
                                cfg.batch_size, False, params.seed)
    # build
    module = TextClassifier(Classifier(backbone, len(labels), cfg.pooling), cfg, cfg.epochs * len(train_loader))
    best = ModelCheckpoint(dirpath=work_dir, filename="best", monitor="val_macro_f1", mode="max", save_top_k=1,
                           save_weights_only=True, enable_version_counter=False)
    trainer = make_trainer(cfg.precision, work_dir, [best], max_epochs=cfg.epochs, log_every_n_steps=5)
    # loop and validate
    trainer.fit(module, train_loader, val_loader)
    module.load_state_dict(torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"])
    return module.classifier, {"val_macro_f1": float(best.best_model_score), "labels": labels,
                               "train_examples": train.height}


def save_classifier(classifier: Classifier, tokenizer_file: Path, summary: dict, pooling: str, out: Path) -> None:
    with atomic_dir(out) as staging:
        save_model(classifier, str(staging / "model.safetensors"))
        meta = {"gpt": classifier.backbone.config.to_dict(), "labels": summary["labels"], "pooling": pooling,
                "temperature": 1.0}
        (staging / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.copy(tokenizer_file, staging / "tokenizer.json")
        (staging / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--pretrained", type=Path, default=Path("models/pretrained"))
    parser.add_argument("--out", type=Path, default=Path("models/classifier"))
    args = parser.parse_args()
    params = load_params(args.params)
    tokenizer = Tokenizer.from_file(str(args.pretrained / "tokenizer.json"))
    with tempfile.TemporaryDirectory(prefix="gptpipe-finetune-") as work_dir:
        classifier, summary = finetune(params, args.prepared, load_backbone(args.pretrained), tokenizer,
                                       Path(work_dir))
    save_classifier(classifier, args.pretrained / "tokenizer.json", summary, params.finetune.pooling, args.out)
    print(f"finetune: best val macro-F1 {summary['val_macro_f1']:.3f} on {summary['train_examples']} examples")


if __name__ == "__main__":
    exit_on_input_error(main)
