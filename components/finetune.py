"""Finetune: a classification head on the pre-trained GPT, trained on the labeled train split by one of four
strategies, best epoch by val macro-F1, temperature fitted on val.

    python -m components.finetune --prepared data/prepared --pretrained models/pretrained --out models/classifier
"""

import argparse
import json
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import lightning as L
import polars as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from safetensors.torch import save_model
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Sampler
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from components import layout
from components.atomic import atomic_dir
from components.curves import publish_curves
from components.errors import exit_on_input_error
from components.inference import (
    LoadedClassifier,
    Windows,
    batches_by_length,
    classify_windows,
    load_backbone,
    pad_windows,
    text_windows,
    token_count,
)
from components.memory import check_fits, training_memory
from components.model import GPT, Classifier, GPTConfig, add_lora, merge_lora
from components.params import FinetuneParams, Params, load_params
from components.sources import file_sha256
from components.special_tokens import padding_id
from components.tfidf import TfidfLogreg
from components.tokenize import held_out_texts, unlabeled_texts
from components.training import adamw, make_trainer, resolve_precision, warmup_cosine


def layer_groups(classifier: Classifier) -> list[list[nn.Parameter]]:
    """ULMFiT's layer groups, bottom to top: embeddings, each block, then the final norm with the head."""
    body = classifier.backbone
    embeddings = [*body.tok_emb.parameters(), *(body.pos_emb.parameters() if body.pos_emb is not None else [])]
    return [embeddings, *(list(block.parameters()) for block in body.blocks),
            [*body.ln_f.parameters(), *classifier.head.parameters()]]


def discriminative_lrs(top_lr: float, groups: int, decay: float) -> list[float]:
    """Bottom to top: each group's rate is the one above it divided by `decay` (ULMFiT: 2.6)."""
    return [top_lr / decay ** (groups - 1 - i) for i in range(groups)]


def slanted_triangular(step: int, total: int, cut_frac: float, ratio: float) -> float:
    """Learning-rate multiplier of ULMFiT's slanted triangular schedule (Howard & Ruder 2018, eq. 3): a short
    linear rise over the first cut_frac of the steps, then a long linear decay, from and to 1/ratio of the peak."""
    cut = max(1, math.floor(total * cut_frac))
    p = step / cut if step < cut else 1 - (step - cut) / (cut * (1 / cut_frac - 1))
    return (1 + max(p, 0.0) * (ratio - 1)) / ratio


def unfreeze_top(groups: list[list[nn.Parameter]], count: int) -> None:
    """Gradual unfreezing: only the top `count` layer groups train."""
    for i, group in enumerate(groups):
        for param in group:
            param.requires_grad_(len(groups) - i <= count)


def prepare(classifier: Classifier, cfg: FinetuneParams) -> list[dict]:
    """Freeze what the strategy keeps fixed (adding LoRA adapters for `lora`); returns the optimizer's groups."""
    head = list(classifier.head.parameters())
    if cfg.strategy == "linear_probe":
        classifier.backbone.requires_grad_(False)
        return [{"params": head, "lr": cfg.learning_rate}]
    if cfg.strategy == "lora":
        classifier.backbone.requires_grad_(False)
        adapters = add_lora(classifier.backbone, cfg.lora_rank, cfg.lora_alpha)
        return [{"params": [p for a in adapters for p in (a.lora_a, a.lora_b)] + head, "lr": cfg.learning_rate}]
    if cfg.strategy == "ulmfit":
        groups = layer_groups(classifier)
        unfreeze_top(groups, 1)
        lrs = discriminative_lrs(cfg.learning_rate, len(groups), cfg.layer_lr_decay)
        return [{"params": group, "lr": lr} for group, lr in zip(groups, lrs, strict=True)]
    return [{"params": list(classifier.parameters()), "lr": cfg.learning_rate}]


def balanced_weights(targets: torch.Tensor, classes: int) -> torch.Tensor:
    """sklearn's `balanced`: n / (classes x count), so every class carries the same total weight."""
    counts = torch.bincount(targets, minlength=classes).float()
    return counts.sum() / (classes * counts.clamp(min=1))


class TextClassifier(L.LightningModule):
    def __init__(self, classifier: Classifier, cfg: FinetuneParams, total_steps: int,
                 class_weight: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.classifier = classifier
        self.groups = prepare(classifier, cfg)
        self.total_steps = total_steps
        self.register_buffer("class_weight", class_weight, persistent=False)
        classes = classifier.head.out_features
        self.val_f1 = MulticlassF1Score(classes, average="macro")
        self.val_accuracy = MulticlassAccuracy(classes, average="micro")
        self.val_loss = MeanMetric()

    def on_train_epoch_start(self) -> None:
        if self.cfg.strategy == "ulmfit":
            unfreeze_top(layer_groups(self.classifier), self.current_epoch + 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, mask, labels = batch
        if self.cfg.aux_lm_weight:
            logits, lm_loss = self.classifier(ids, mask, lm_loss=True)
            self.log("train_lm_loss", lm_loss)
        else:
            logits, lm_loss = self.classifier(ids, mask), 0.0
        loss = F.cross_entropy(logits.float(), labels, weight=self.class_weight) + self.cfg.aux_lm_weight * lm_loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        ids, mask, labels = batch
        logits = self.classifier(ids, mask)
        predictions = logits.argmax(dim=-1)
        self.val_f1.update(predictions, labels)
        self.val_accuracy.update(predictions, labels)
        self.val_loss.update(F.cross_entropy(logits.float(), labels), weight=len(labels))
        self.log_dict({"val_macro_f1": self.val_f1, "val_accuracy": self.val_accuracy, "val_loss": self.val_loss},
                      prog_bar=True)

    def configure_optimizers(self):
        cfg = self.cfg
        optimizer = adamw(self.groups, self.device, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        if cfg.strategy == "ulmfit":
            def multiplier(step: int) -> float:
                return slanted_triangular(step, self.total_steps, cfg.cut_frac, cfg.stlr_ratio)
        else:
            warmup = int(cfg.warmup_fraction * self.total_steps)

            def multiplier(step: int) -> float:
                return warmup_cosine(step, warmup, self.total_steps, 0.0)
        # One multiplier for every group keeps the discriminative rates' ratios.
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


LabeledRows = list[tuple[Windows, int]]  # each text's windows and its label's index


def labeled_rows(frame: pl.DataFrame, tokenizer: Tokenizer, labels: list[str], context: int,
                 max_chunks: int) -> LabeledRows:
    windows = text_windows(tokenizer, frame["text"].to_list(), context, max_chunks)
    return list(zip(windows, [labels.index(label) for label in frame["label"].to_list()], strict=True))


class DrawWindows:
    """Collate labeled rows into one batch padded to its own longest window, keeping `count` windows of each text
    drawn at random: a training step costs `count` windows whatever the text's length, and every epoch sees other
    parts of long texts; with `count` = max_chunks (validation) every window is kept."""

    def __init__(self, count: int, pad: int, context_length: int, seed: int):
        self.count, self.pad, self.context = count, pad, context_length
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, rows: LabeledRows) -> list[torch.Tensor]:
        picked = []
        for windows, _ in rows:
            if len(windows) > self.count:
                keep = torch.randperm(len(windows), generator=self.generator)[: self.count].sort().values
                windows = [windows[i] for i in keep.tolist()]
            picked.append(windows)
        ids, mask = pad_windows(picked, self.pad, self.context)
        return [ids, mask, torch.tensor([label for _, label in rows])]


class ShuffledBuckets(Sampler[list[int]]):
    """Training batches of similar length, new ones every epoch: the rows are shuffled, then each pool of
    `pool` batches is sorted by length jittered by up to 25% (so that neighbours in length still mix) and cut into
    batches, which are shuffled. Short texts then pay for their own padding only."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, pool: int = 50):
        self.lengths, self.batch_size, self.pool = lengths, batch_size, pool
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        jitter = torch.empty(len(order)).uniform_(0.8, 1.25, generator=self.generator).tolist()
        span = self.batch_size * self.pool
        batches = []
        for start in range(0, len(order), span):
            pool = sorted(range(start, min(start + span, len(order))), key=lambda i: self.lengths[order[i]] * jitter[i])
            batches += [[order[i] for i in pool[k : k + self.batch_size]] for k in range(0, len(pool), self.batch_size)]
        for index in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[index]


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature that minimises the NLL of `logits / T` (Guo et al. 2017), searched on a fine log grid
    from 0.05 to 20: one parameter, so a grid is exact enough and cannot diverge."""
    grid = torch.logspace(math.log10(0.05), math.log10(20.0), 600, dtype=torch.float64)
    nll = torch.stack([F.cross_entropy(logits.double() / t, targets) for t in grid])
    return round(float(grid[nll.argmin()]), 4)


def training_epochs(examples: int, cfg: FinetuneParams) -> int:
    """finetune.epochs, or enough epochs for steps_per_sqrt_example x sqrt(examples) optimizer steps: a recipe that
    gives 50 examples 15 passes and 1,500 examples 4 (measured: README, "The few-label recipe")."""
    if cfg.epochs:
        return cfg.epochs
    steps_per_epoch = math.ceil(examples / cfg.batch_size)
    return math.ceil(cfg.steps_per_sqrt_example * math.sqrt(examples) / steps_per_epoch)


def peak_learning_rate(labels: int, classes: int, cfg: FinetuneParams) -> float:
    """finetune.learning_rate, scaled down above learning_rate_labels_per_class as (labels per class)^-1/4 (1 /
    sqrt(steps) under steps_per_sqrt_example): with every label, a fixed rate over-trained the short-text sets,
    and a rule on all labels, not per class, starved the many-class sets (README, "The few-label recipe")."""
    reference, per_class = cfg.learning_rate_labels_per_class, labels / classes
    if reference is None or per_class <= reference:
        return cfg.learning_rate
    return cfg.learning_rate * (reference / per_class) ** 0.25


def training_precision(cfg: FinetuneParams, lengths: list[int]) -> str:
    """finetune.precision, with `auto` judged on the real tokens of an average training step."""
    return resolve_precision(cfg.precision, step_tokens=round(cfg.batch_size * sum(lengths) / len(lengths)))


def check_memory(config: GPTConfig, cfg: FinetuneParams, classes: int) -> None:
    """Stop before any weights load when a training step of the strategy cannot fit in the memory free where it
    would run: the largest step, every window full (and `auto` precision judged on that step)."""
    windows = cfg.train_windows or cfg.max_chunks
    precision = resolve_precision(cfg.precision, step_tokens=cfg.batch_size * windows * config.context_length)
    need = training_memory(config, precision, cfg.batch_size * windows, cfg.strategy, cfg.lora_rank, classes,
                           lm_loss=cfg.aux_lm_weight > 0)
    fixes = ["use finetune.strategy=lora"] if cfg.strategy in ("full", "ulmfit") else []
    fixes += ["lower finetune.batch_size" + (" or finetune.train_windows" if windows > 1 else "")]
    check_fits(need, f"{cfg.strategy} fine-tuning of a {need.parameters:,}-parameter GPT ({cfg.batch_size} "
               f"texts x {windows} window(s) x {config.context_length} tokens a step, {precision})",
               f"{', '.join(fixes)}, or run the stage where more memory is free (the gpu work pool)")


def finetune(params: Params, prepared: Path, backbone: GPT, tokenizer: Tokenizer, work_dir: Path,
             train: pl.DataFrame | None = None, select_on_val: bool = True,
             curves: Path | None = None, labeled: int | None = None) -> tuple[Classifier, dict]:
    """Fine-tune `backbone` (pre-trained, or freshly initialised for the scratch baseline) on `train` (the train
    split by default) for `training_epochs`, at the `peak_learning_rate` of `labeled` (how many of `train`'s rows
    are labels rather than guesses; all by default). With `select_on_val` it keeps the epoch with the best val
    macro-F1 and fits the temperature on val; without, it uses no val labels and keeps the last epoch. With
    `curves`, the training curves are logged into that folder."""
    # setup
    L.seed_everything(params.seed, workers=True, verbose=False)
    train = pl.read_parquet(prepared / "train.parquet") if train is None else train
    labels = json.loads((prepared / "labels.json").read_text())
    cfg = params.finetune.model_copy(
        update={"learning_rate": peak_learning_rate(labeled or train.height, len(labels), params.finetune)})
    epochs = training_epochs(train.height, cfg)
    context, pad = backbone.config.context_length, padding_id(tokenizer)
    train_rows = labeled_rows(train, tokenizer, labels, context, cfg.max_chunks)
    drawn = cfg.train_windows or cfg.max_chunks
    lengths = [min(token_count(windows), drawn * context) for windows, _ in train_rows]
    train_loader = DataLoader(train_rows, batch_sampler=ShuffledBuckets(lengths, cfg.batch_size, params.seed),
                              collate_fn=DrawWindows(drawn, pad, context, params.seed))
    val_rows, val_loader = [], None
    if select_on_val:
        val_rows = labeled_rows(pl.read_parquet(prepared / "val.parquet"), tokenizer, labels, context, cfg.max_chunks)
        val_loader = DataLoader(val_rows, batch_sampler=batches_by_length([w for w, _ in val_rows], cfg.batch_size),
                                collate_fn=DrawWindows(cfg.max_chunks, pad, context, params.seed))
    # build
    targets = torch.tensor([label for _, label in train_rows])
    weights = balanced_weights(targets, len(labels)) if cfg.class_weights == "balanced" else None
    module = TextClassifier(Classifier(backbone, len(labels), cfg.pooling), cfg, epochs * len(train_loader), weights)
    best = ModelCheckpoint(dirpath=work_dir, filename="best", monitor="val_macro_f1", mode="max", save_top_k=1,
                           save_weights_only=True, enable_version_counter=False)
    callbacks = [best] if select_on_val else []
    if select_on_val and cfg.patience:
        callbacks.append(EarlyStopping(monitor="val_macro_f1", mode="max", patience=cfg.patience))
    precision = training_precision(cfg, lengths)
    trainer = make_trainer(precision, work_dir, callbacks, curves=curves, max_epochs=epochs,
                           enable_checkpointing=select_on_val)
    # loop and validate
    trainer.fit(module, train_loader, val_loader)
    summary = {"strategy": cfg.strategy, "precision": precision, "learning_rate": cfg.learning_rate,
               "labels": labels, "train_examples": train.height, "epochs_trained": trainer.current_epoch,
               "steps": trainer.global_step,
               "train_loss": float(trainer.callback_metrics["train_loss"])}  # the last step's
    if select_on_val:
        module.load_state_dict(torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"])
        summary["val_macro_f1"] = float(best.best_model_score)
    classifier = module.classifier.cpu()
    if cfg.strategy == "lora":
        merge_lora(classifier.backbone)
    classifier.requires_grad_(True).eval()
    if select_on_val:
        logits = classify_windows(classifier, [windows for windows, _ in val_rows], pad, cfg.batch_size)
        targets = torch.tensor([label for _, label in val_rows])
        summary["temperature"] = fit_temperature(logits, targets)
        summary["val_nll"] = {"before": F.cross_entropy(logits, targets).item(),
                              "after": F.cross_entropy(logits / summary["temperature"], targets).item()}
    return classifier, summary


def most_confident(reader: LoadedClassifier, texts: list[str], per_class: int,
                   agreeing: list[str] | None = None) -> pl.DataFrame:
    """Up to `per_class` of `texts` for each label, those the classifier is surest of, with its labels; with
    `agreeing` (another model's labels for the same texts), only texts where both models agree."""
    confidence, predicted = reader.predict_proba(texts).max(dim=-1)
    guesses = pl.DataFrame({"text": texts, "label": [reader.labels[i] for i in predicted.tolist()],
                            "confidence": confidence.tolist()})
    if agreeing is not None:
        guesses = guesses.filter(pl.col("label") == pl.Series(agreeing))
    return (guesses.sort("confidence", descending=True, maintain_order=True)
            .group_by("label", maintain_order=True).head(per_class).select("text", "label"))


def self_training_pool(params: Params, prepared: Path, labeled: pl.DataFrame) -> list[str]:
    """The task's texts without labels, at most `finetune.pseudo_label_pool`: the train split's texts outside
    `labeled`, those whose labels `data.labels_per_class` held back, then `data.unlabeled.paths` without
    validation or test text (as pre-training reads them)."""
    limit = params.finetune.pseudo_label_pool
    train = pl.concat([pl.read_parquet(prepared / "train.parquet", columns=["text"]),
                       pl.read_parquet(prepared / "unlabeled.parquet", columns=["text"])])
    pool = train.join(labeled.select("text"), on="text", how="anti", maintain_order="left")["text"].to_list()[:limit]
    if len(pool) < limit and params.data.unlabeled.paths:
        for batch in unlabeled_texts(params, held_out_texts(prepared), Counter()):
            pool += batch[: limit - len(pool)]
            if len(pool) == limit:
                break
    return pool


def finetune_and_self_train(params: Params, prepared: Path, initial: Callable[[], GPT], tokenizer: Tokenizer,
                            work_dir: Path, train: pl.DataFrame | None = None, select_on_val: bool = True,
                            curves: Path | None = None) -> tuple[LoadedClassifier, dict]:
    """`finetune` from the weights `initial` builds; then, with `finetune.pseudo_labels` K and task texts without
    labels (`self_training_pool`), self-training: the model labels them, and its surest K x (labels per class)
    guesses of each class, kept only where TF-IDF trained on the same labels agrees (`pseudo_label_agreement`),
    join the labels in a fresh fine-tune from the same initial weights; round r of `pseudo_label_rounds` takes
    r x K from the model the round before. Returns the delivered classifier (the last model, with TF-IDF fused in
    at `finetune.tfidf_weight`, fitted on the labels and, with `tfidf_on_guesses`, the last round's guesses) and a
    summary counting the last round's guesses (`pseudo_labeled`); `train_examples` counts the labels."""
    cfg = params.finetune
    train = pl.read_parquet(prepared / "train.parquet") if train is None else train
    labels = json.loads((prepared / "labels.json").read_text())
    pool = self_training_pool(params, prepared, train) if cfg.pseudo_labels else []
    tfidf = (TfidfLogreg.fit(train, labels, params.seed)
             if cfg.tfidf_weight or (pool and cfg.pseudo_label_agreement) else None)

    def delivered(model: Classifier, summary: dict) -> LoadedClassifier:
        return LoadedClassifier(model, tokenizer, labels, summary.get("temperature", 1.0), cfg.max_chunks,
                                tfidf if cfg.tfidf_weight else None, cfg.tfidf_weight)

    if not pool:
        model, summary = finetune(params, prepared, initial(), tokenizer, work_dir, train, select_on_val, curves)
        return delivered(model, summary), {**summary, "pseudo_labeled": 0}
    model, _ = finetune(params, prepared, initial(), tokenizer, work_dir / "labeled", train, select_on_val)
    second_view = tfidf.predict(pool) if cfg.pseudo_label_agreement else None
    per_class = math.ceil(train.height / len(labels)) * cfg.pseudo_labels
    labeler = f"{train.height} labels"
    for round_ in range(1, cfg.pseudo_label_rounds + 1):
        reader = LoadedClassifier(model, tokenizer, labels, 1.0, cfg.max_chunks)
        guessed = most_confident(reader, pool, per_class * round_, second_view)
        print(f"finetune: self-training round {round_} with {guessed.height} of {len(pool)} texts without labels, "
              f"labeled by the model fine-tuned on {labeler}", flush=True)
        last = round_ == cfg.pseudo_label_rounds
        model, summary = finetune(params, prepared, initial(), tokenizer, work_dir / f"self-trained-{round_}",
                                  pl.concat([train.select("text", "label"), guessed]), select_on_val,
                                  curves if last else None, labeled=train.height)
        labeler = f"{train.height} labels and {guessed.height} guesses"
    if cfg.tfidf_weight and cfg.tfidf_on_guesses:
        shares = dict(train["label"].value_counts(normalize=True).iter_rows())  # the labels' prior, not the guesses'
        guesses = guessed.filter(pl.col("label").is_in(list(shares)))
        tfidf = TfidfLogreg.fit(pl.concat([train.select("text", "label"), guesses]), labels, params.seed, shares)
    return delivered(model, summary), {**summary, "train_examples": train.height, "pseudo_labeled": guessed.height}


def save_classifier(classifier: Classifier, tokenizer_file: Path, summary: dict, cfg: FinetuneParams,
                    out: Path, tfidf: TfidfLogreg | None = None) -> None:
    """Weights with the plain GPT keys (adapters merged), how to read a text, the fitted temperature, and the
    TF-IDF half with its weight where there is one."""
    with atomic_dir(out) as staging:
        save_model(classifier, str(staging / "model.safetensors"))
        meta = {"gpt": classifier.backbone.config.to_dict(), "labels": summary["labels"], "pooling": cfg.pooling,
                "max_chunks": cfg.max_chunks, "temperature": summary.get("temperature", 1.0),
                "tfidf_weight": cfg.tfidf_weight if tfidf else 0.0,
                "tokenizer_sha256": file_sha256(tokenizer_file)}
        if tfidf:
            tfidf.save(staging)
        (staging / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.copy(tokenizer_file, staging / "tokenizer.json")
        (staging / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=layout.PREPARED)
    parser.add_argument("--pretrained", type=Path, default=layout.PRETRAINED)
    parser.add_argument("--out", type=Path, default=layout.CLASSIFIER)
    parser.add_argument("--curves", type=Path, default=layout.FINETUNE_CURVES)
    args = parser.parse_args()
    params = load_params(args.params)
    labels = json.loads((args.prepared / "labels.json").read_text())
    check_memory(GPTConfig(**json.loads((args.pretrained / "config.json").read_text())), params.finetune, len(labels))
    tokenizer = Tokenizer.from_file(str(args.pretrained / "tokenizer.json"))
    with tempfile.TemporaryDirectory(prefix="gptpipe-finetune-") as work_dir:
        work_curves = Path(work_dir) / "curves"
        classifier, summary = finetune_and_self_train(params, args.prepared, lambda: load_backbone(args.pretrained),
                                                      tokenizer, Path(work_dir), curves=work_curves)
        save_classifier(classifier.model, args.pretrained / "tokenizer.json", summary, params.finetune, args.out,
                        classifier.tfidf)
        publish_curves(work_curves, args.curves)
    print(f"finetune: {summary['strategy']}, best val macro-F1 {summary['val_macro_f1']:.3f} on "
          f"{summary['train_examples']} examples (+{summary['pseudo_labeled']} self-trained); "
          f"temperature {summary['temperature']:.2f} "
          f"(val NLL {summary['val_nll']['before']:.3f} -> {summary['val_nll']['after']:.3f})"
          + (f"; TF-IDF fused in at weight {classifier.tfidf_weight}" if classifier.tfidf else ""))


if __name__ == "__main__":
    exit_on_input_error(main)
