"""Fine-tuning strategies on a tiny real model: which tensors train and which stay frozen, schedules, LoRA merge,
chunked reading, temperature fitting and the classifier folder."""

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_model
from sklearn.utils.class_weight import compute_class_weight
from tokenizers import Tokenizer

from components import training
from components.curves import read_curves
from components.errors import InputError
from components.finetune import (
    DrawWindows,
    ShuffledBuckets,
    TextClassifier,
    balanced_weights,
    finetune,
    finetune_and_self_train,
    fit_temperature,
    layer_groups,
    peak_learning_rate,
    save_classifier,
    self_training_pool,
    slanted_triangular,
    training_epochs,
)
from components.inference import (
    batches_by_length,
    classify_windows,
    encode_chunks,
    load_backbone,
    load_classifier,
    text_windows,
)
from components.model import GPT, Classifier, GPTConfig, add_lora, merge_lora
from components.params import FinetuneParams, Params, to_yaml
from components.special_tokens import padding_id
from components.tfidf import TfidfLogreg
from components.tokenize import train_tokenizer
from tests.conftest import TINY_PARAMS, support_tickets

TINY = GPTConfig(vocab_size=320, context_length=32, n_layer=2, n_head=2, d_model=16)


def make_workspace(root: Path, config: GPTConfig = TINY) -> tuple[Path, Path]:
    """data/prepared (train/val/test, labels.json) from the synthetic tickets and models/pretrained (a freshly
    initialised tiny GPT of `config`, its config, tokenizer and metrics), laid out as the stages write them."""
    rows = support_tickets(rows_per_label=30)
    random.Random(0).shuffle(rows)
    prepared, pretrained = root / "prepared", root / "pretrained"
    prepared.mkdir(parents=True)
    pretrained.mkdir(parents=True)
    for name, part in (("train", rows[:54]), ("val", rows[54:72]), ("test", rows[72:])):
        pl.DataFrame(part).write_parquet(prepared / f"{name}.parquet")
    pl.DataFrame({"text": []}, schema={"text": pl.String}).write_parquet(prepared / "unlabeled.parquet")
    (prepared / "labels.json").write_text(json.dumps(sorted({row["label"] for row in rows})))
    tokenizer = train_tokenizer((row["text"] for row in rows[:54]), config.vocab_size, 2)
    tokenizer.save(str(pretrained / "tokenizer.json"))
    torch.manual_seed(0)
    model = GPT(config)
    save_model(model, str(pretrained / "model.safetensors"))
    (pretrained / "config.json").write_text(json.dumps(config.to_dict()))
    (pretrained / "metrics.json").write_text(json.dumps({"val_perplexity": 300.0, "tokens_per_second": 1.0,
                                                         "n_params": model.num_params(non_embedding=False)}))
    return prepared, pretrained


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, Path]:
    return make_workspace(tmp_path_factory.mktemp("workspace"))


def tiny_params(**finetune) -> Params:
    return Params.model_validate({**TINY_PARAMS, "finetune": {**TINY_PARAMS["finetune"], **finetune}})


def run(workspace, tmp_path, epochs: int | None = 1, select_on_val: bool = True, **finetune_options):
    prepared, pretrained = workspace
    backbone = load_backbone(pretrained)
    before = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
    tokenizer = Tokenizer.from_file(str(pretrained / "tokenizer.json"))
    classifier, summary = finetune(tiny_params(epochs=epochs, **finetune_options), prepared, backbone, tokenizer,
                                   tmp_path, select_on_val=select_on_val)
    after = {name.removeprefix("backbone."): tensor for name, tensor in classifier.state_dict().items()}
    changed = {name for name, tensor in before.items() if not torch.equal(tensor, after[name])}
    return classifier, summary, before, changed


def test_full_trains_every_tensor(workspace, tmp_path):
    classifier, _, before, changed = run(workspace, tmp_path, strategy="full", learning_rate=1e-2)
    assert changed == set(before)
    assert not torch.equal(classifier.head.bias, torch.zeros_like(classifier.head.bias))


def test_linear_probe_trains_only_the_head(workspace, tmp_path):
    classifier, _, _, changed = run(workspace, tmp_path, strategy="linear_probe", learning_rate=1e-2)
    assert changed == set()
    assert not torch.equal(classifier.head.bias, torch.zeros_like(classifier.head.bias))


@pytest.mark.parametrize("epochs", [1, 2, 4])
def test_ulmfit_unfreezes_one_layer_group_per_epoch(workspace, tmp_path, epochs):
    # groups bottom to top: embeddings, block 0, block 1, final norm + head; the last epoch is kept
    _, _, before, changed = run(workspace, tmp_path, epochs=epochs, select_on_val=False, strategy="ulmfit",
                                learning_rate=1e-2)
    groups = [{"tok_emb", "pos_emb"}, {"blocks.0"}, {"blocks.1"}, {"ln_f"}]
    for distance, prefixes in enumerate(reversed(groups)):
        names = {name for name in before if name.startswith(tuple(prefixes))}
        assert (names <= changed) if distance < epochs else not (names & changed), (distance, names & changed)


def test_slanted_triangular_follows_howard_and_ruder():
    total, cut_frac, ratio = 200, 0.1, 32
    cut = math.floor(total * cut_frac)
    for step in range(total):
        p = step / cut if step < cut else 1 - (step - cut) / (cut * (1 / cut_frac - 1))
        assert slanted_triangular(step, total, cut_frac, ratio) == pytest.approx((1 + p * (ratio - 1)) / ratio)
    assert slanted_triangular(0, total, cut_frac, ratio) == pytest.approx(1 / 32)
    assert slanted_triangular(cut, total, cut_frac, ratio) == pytest.approx(1.0)
    assert slanted_triangular(total, total, cut_frac, ratio) == pytest.approx(1 / 32)


def test_ulmfit_rates_fall_by_2_6_per_layer_group_and_follow_the_schedule():
    params = tiny_params(strategy="ulmfit", learning_rate=1e-2)
    module = TextClassifier(Classifier(GPT(TINY), 3), params.finetune, total_steps=50)
    config = module.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert len(optimizer.param_groups) == len(layer_groups(module.classifier)) == TINY.n_layer + 2
    for step in range(12):
        rates = [group["lr"] for group in optimizer.param_groups]
        multiplier = slanted_triangular(step, 50, 0.1, 32)
        assert rates[-1] == pytest.approx(1e-2 * multiplier)
        assert all(upper / lower == pytest.approx(2.6) for lower, upper in zip(rates, rates[1:], strict=False))
        optimizer.step()
        schedule.step()


def test_lora_trains_low_rank_updates_and_exports_plain_weights(workspace, tmp_path):
    classifier, summary, before, changed = run(workspace, tmp_path, strategy="lora", lora_rank=2, lora_alpha=4,
                                               learning_rate=1e-2)
    adapted = {f"blocks.{i}.{part}.{name}.weight" for i in range(TINY.n_layer)
               for part, name in (("attn", "qkv"), ("attn", "proj"), ("mlp", "up"), ("mlp", "down"))}
    assert changed == adapted  # embeddings, norms and every bias stayed frozen
    weights = classifier.backbone.state_dict()
    for name in adapted:
        assert torch.linalg.matrix_rank(weights[name] - before[name]) <= 2
    assert set(classifier.state_dict()) == set(Classifier(GPT(TINY), 3).state_dict())

    out = tmp_path / "classifier"
    save_classifier(classifier, workspace[1] / "tokenizer.json", summary, tiny_params().finetune, out)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "classifier.json", "tokenizer.json",
                                              "metrics.json"}
    assert not any("lora" in key for key in load_file(out / "model.safetensors"))
    loaded = load_classifier(out)
    meta = json.loads((out / "classifier.json").read_text())
    assert loaded.temperature == meta["temperature"] == summary["temperature"]
    texts = pl.read_parquet(workspace[0] / "test.parquet")["text"].to_list()[:5]
    ids, mask = encode_chunks(loaded.tokenizer, texts, TINY.context_length, meta["max_chunks"])
    with torch.no_grad():
        expected = torch.softmax(classifier(ids, mask) / summary["temperature"], dim=-1)
    assert torch.allclose(loaded.predict_proba(texts), expected, atol=1e-5)

    # another tokenizer of the same vocabulary size in the folder: refused, not silently used
    other = train_tokenizer((text[::-1] for text in texts * 20), TINY.vocab_size, 2)
    other.save(str(out / "tokenizer.json"))
    assert other.get_vocab_size() == loaded.tokenizer.get_vocab_size()
    with pytest.raises(InputError, match="not the tokenizer this classifier was trained with"):
        load_classifier(out)


def test_lora_merge_gives_the_same_logits():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    adapters = add_lora(model, rank=4, alpha=8)
    for adapter in adapters:
        torch.nn.init.normal_(adapter.lora_b, std=0.05)
    idx = torch.randint(0, TINY.vocab_size, (2, 20))
    with torch.no_grad():
        with_adapters = model(idx)
        merged = merge_lora(model)(idx)
    assert not any("lora" in name for name in model.state_dict())
    assert torch.allclose(with_adapters, merged, atol=1e-5)


def test_long_texts_are_read_in_windows():
    torch.manual_seed(0)
    classifier = Classifier(GPT(TINY), 3).eval()
    ids = torch.randint(0, TINY.vocab_size, (1, 2, TINY.context_length))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        states = torch.cat([classifier.backbone.hidden_states(ids[:, k])[0] for k in range(2)], dim=1)
        assert torch.allclose(classifier(ids, mask), classifier.head(states.mean(dim=1)), atol=1e-5)
        # a one-window text batched beside a two-window one: its padding window changes nothing
        short = torch.zeros_like(ids)
        short[0, 0, :5] = ids[0, 0, :5]
        short_mask = torch.zeros_like(mask)
        short_mask[0, 0, :5] = 1
        both = classifier(torch.cat([ids, short]), torch.cat([mask, short_mask]))
        assert torch.allclose(both[1], classifier(ids[:, 0, :5], mask[:, 0, :5])[0], atol=1e-5)


def test_chunk_encoding_covers_the_text_up_to_max_chunks(workspace):
    tokenizer = Tokenizer.from_file(str(workspace[1] / "tokenizer.json"))
    text = " ".join(["refund invoice payment"] * 40)
    total = len(tokenizer.encode(text).ids)
    ids, mask = encode_chunks(tokenizer, [text, "hi"], 32, max_chunks=3)
    assert total > 96
    assert ids.shape == (2, 3, 32) and mask[0].sum() == 96 and mask[1].sum() == len(tokenizer.encode("hi").ids)
    assert ids[0][mask[0].bool()].tolist() == tokenizer.encode(text).ids[:96]


def test_auxiliary_loss_is_the_next_token_loss():
    torch.manual_seed(0)
    classifier = Classifier(GPT(TINY), 3).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 12))
    with torch.no_grad():
        _, lm_loss = classifier(idx, torch.ones_like(idx), lm_loss=True)
        expected = F.cross_entropy(classifier.backbone(idx)[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
    assert lm_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_aux_lm_and_balanced_weights_train(workspace, tmp_path):
    _, summary, before, changed = run(workspace, tmp_path, aux_lm_weight=0.5, class_weights="balanced",
                                      max_chunks=2)
    assert changed == set(before) and summary["val_macro_f1"] >= 0
    targets = torch.tensor([0, 0, 0, 1, 2, 2])
    expected = compute_class_weight("balanced", classes=np.arange(3), y=targets.numpy())
    assert torch.allclose(balanced_weights(targets, 3), torch.tensor(expected, dtype=torch.float32))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_training_loss_is_the_class_weighted_loss_plus_the_weighted_next_token_loss():
    """On a fixed batch: sum_i w[y_i] * nll_i / sum_i w[y_i] + aux_lm_weight * mean next-token nll."""
    torch.manual_seed(0)
    ids, labels = torch.randint(0, TINY.vocab_size, (6, 12)), torch.tensor([0, 0, 0, 1, 2, 2])
    weights = balanced_weights(labels, 3)
    cfg = FinetuneParams(aux_lm_weight=0.5, class_weights="balanced")
    module = TextClassifier(Classifier(GPT(TINY), 3), cfg, total_steps=1, class_weight=weights).eval()
    with torch.no_grad():
        loss = module.training_step([ids, torch.ones_like(ids), labels], 0)
        nll = -F.log_softmax(module.classifier(ids, torch.ones_like(ids)).double(), dim=-1)[torch.arange(6), labels]
        classes = (weights.double()[labels] * nll).sum() / weights.double()[labels].sum()
        next_token = -F.log_softmax(module.classifier.backbone(ids)[:, :-1].double(), dim=-1)
        lm = next_token.gather(-1, ids[:, 1:, None]).mean()
    assert weights.tolist() == pytest.approx([2 / 3, 2.0, 1.0])
    assert loss.item() == pytest.approx((classes + 0.5 * lm).item(), rel=1e-5)


def test_training_steps_follow_the_number_of_examples(workspace, tmp_path):
    cfg = FinetuneParams(batch_size=16, steps_per_sqrt_example=8)
    assert [training_epochs(n, cfg) for n in (20, 50, 1500)] == [18, 15, 4]  # 36, 60 and 376 optimizer steps
    assert training_epochs(50, cfg.model_copy(update={"epochs": 3})) == 3
    # 54 examples in batches of 8: sqrt(54) x 1.5 = 11 steps, two epochs of 7
    _, summary, _, _ = run(workspace, tmp_path, epochs=None, steps_per_sqrt_example=1.5)
    assert summary["epochs_trained"] == 2


def test_learning_rate_follows_the_labels_per_class(workspace, tmp_path):
    cfg = FinetuneParams(learning_rate=1e-3, learning_rate_labels_per_class=10)
    rates = [peak_learning_rate(labels, classes, cfg) for labels, classes in ((20, 2), (50, 5), (800, 5), (800, 80))]
    assert rates == pytest.approx([1e-3, 1e-3, 1e-3 * (10 / 160) ** 0.25, 1e-3])  # 160 = 16 x 10 a class
    assert peak_learning_rate(800, 5, cfg.model_copy(update={"learning_rate_labels_per_class": None})) == 1e-3
    _, summary, _, _ = run(workspace, tmp_path, learning_rate=1e-3, learning_rate_labels_per_class=9)  # 54 of 3
    assert summary["learning_rate"] == pytest.approx(1e-3 * 0.5 ** 0.25)


def test_self_training_pool_holds_the_task_texts_without_labels_and_no_held_out_text(tmp_path):
    prepared, _ = make_workspace(tmp_path)
    train = pl.read_parquet(prepared / "train.parquet")
    pl.DataFrame({"text": ["held back one", "held back two"]}).write_parquet(prepared / "unlabeled.parquet")
    test_text = pl.read_parquet(prepared / "test.parquet")["text"][0]
    extra = tmp_path / "extra.jsonl"
    pl.DataFrame({"text": ["new one", test_text, "new two", "new three"]}).write_ndjson(extra)

    def pool(limit: int) -> list[str]:
        params = Params.model_validate({**TINY_PARAMS, "data": {**TINY_PARAMS["data"],
                                                                "unlabeled": {"paths": [str(extra)]}},
                                        "finetune": {**TINY_PARAMS["finetune"], "pseudo_label_pool": limit}})
        return self_training_pool(params, prepared, train.head(50))

    everything = train["text"][50:].to_list() + ["held back one", "held back two", "new one", "new two", "new three"]
    assert pool(100) == everything  # the test text is not among them
    assert pool(7) == everything[:7]


@pytest.mark.parametrize("pseudo_labels, rounds", [(0, 1), (2, 1), (2, 2)])
def test_few_labels_self_train_on_the_texts_without_labels(tmp_path, pseudo_labels, rounds):
    prepared, pretrained = make_workspace(tmp_path)
    train = pl.read_parquet(prepared / "train.parquet")
    labeled = train.group_by("label", maintain_order=True).head(3)  # 9 labels, as data.labels_per_class: 3 leaves
    labeled.write_parquet(prepared / "train.parquet")
    train.join(labeled, on="text", how="anti").select("text").write_parquet(prepared / "unlabeled.parquet")
    params = tiny_params(epochs=1, pseudo_labels=pseudo_labels, pseudo_label_agreement=False,
                         pseudo_label_rounds=rounds, learning_rate=1e-3, learning_rate_labels_per_class=1)
    _, summary = finetune_and_self_train(params, prepared, lambda: load_backbone(pretrained),
                                         Tokenizer.from_file(str(pretrained / "tokenizer.json")), tmp_path / "work")
    assert summary["train_examples"] == 9
    if pseudo_labels:  # the surest rounds x 2 x 3 guesses of each class the model predicts
        assert 0 < summary["pseudo_labeled"] <= rounds * 18
        rounds_trained = sorted(folder.name for folder in (tmp_path / "work").iterdir())
        assert rounds_trained == ["labeled", *(f"self-trained-{r}" for r in range(1, rounds + 1))]
    else:
        assert summary["pseudo_labeled"] == 0
    assert summary["steps"] == math.ceil((9 + summary["pseudo_labeled"]) / 8)  # one epoch over labels and guesses
    assert summary["learning_rate"] == pytest.approx(1e-3 * (1 / 3) ** 0.25)  # the 9 labels' rate: guesses not counted


@pytest.mark.parametrize("on_guesses", [False, True])
def test_the_tfidf_half_learns_from_the_guesses_only_with_tfidf_on_guesses(tmp_path, on_guesses):
    prepared, pretrained = make_workspace(tmp_path)
    train, labels = pl.read_parquet(prepared / "train.parquet"), json.loads((prepared / "labels.json").read_text())
    labeled = train.group_by("label", maintain_order=True).head(3)
    labeled.write_parquet(prepared / "train.parquet")
    train.join(labeled, on="text", how="anti").select("text").write_parquet(prepared / "unlabeled.parquet")
    params = tiny_params(epochs=1, pseudo_labels=2, pseudo_label_agreement=False, tfidf_weight=1.0,
                         tfidf_on_guesses=on_guesses)
    reader, summary = finetune_and_self_train(params, prepared, lambda: load_backbone(pretrained),
                                              Tokenizer.from_file(str(pretrained / "tokenizer.json")), tmp_path / "w")
    assert summary["pseudo_labeled"] > 0
    from_labels = set(TfidfLogreg.fit(labeled, labels, params.seed).vectorizer.vocabulary_)
    vocabulary = set(reader.tfidf.vectorizer.vocabulary_)
    assert vocabulary > from_labels if on_guesses else vocabulary == from_labels


def test_the_delivered_classifier_fuses_tfidf_fitted_on_the_same_labels(workspace, tmp_path):
    prepared, pretrained = workspace
    tokenizer = Tokenizer.from_file(str(pretrained / "tokenizer.json"))
    train, test = pl.read_parquet(prepared / "train.parquet"), pl.read_parquet(prepared / "test.parquet")
    texts, labels = test["text"].to_list(), json.loads((prepared / "labels.json").read_text())
    for weight in (1.5, 0.0):
        params = tiny_params(pseudo_labels=0, tfidf_weight=weight)
        reader, summary = finetune_and_self_train(params, prepared, lambda: load_backbone(pretrained), tokenizer,
                                                  tmp_path / f"work-{weight}")
        gpt = torch.log_softmax(reader.predict_logits(texts) / summary["temperature"], dim=-1)
        bag_of_words = TfidfLogreg.fit(train, labels, params.seed).log_proba(texts)
        expected = torch.softmax(gpt + weight * bag_of_words, dim=-1)
        assert torch.allclose(reader.predict_proba(texts), expected, atol=1e-6)

        out = tmp_path / f"classifier-{weight}"
        save_classifier(reader.model, pretrained / "tokenizer.json", summary, params.finetune, out, reader.tfidf)
        half = {"tfidf.json", "tfidf.safetensors"}
        assert half <= {p.name for p in out.iterdir()} if weight else not half & {p.name for p in out.iterdir()}
        assert json.loads((out / "classifier.json").read_text())["tfidf_weight"] == weight
        assert torch.allclose(load_classifier(out).predict_proba(texts), expected, atol=1e-5)
        if weight:  # the tickets' words give their labels away, which one epoch of a random tiny GPT has not learnt
            truth = torch.tensor([labels.index(label) for label in test["label"]])
            assert (expected.argmax(-1) == truth).float().mean() > (gpt.argmax(-1) == truth).float().mean()


def test_stage_writes_curves_with_a_row_per_step(workspace, tmp_path):
    prepared, pretrained = workspace
    params = tmp_path / "params.yaml"
    params.write_text(to_yaml(tiny_params(epochs=2)))
    done = subprocess.run([sys.executable, "-m", "components.finetune", "--params", params, "--prepared", prepared,
                           "--pretrained", pretrained, "--out", tmp_path / "classifier", "--curves",
                           tmp_path / "curves"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "classifier/metrics.json").read_text())
    curves = read_curves(tmp_path / "curves")
    steps = summary["steps"]  # 54 examples in batches of 8: 7 a epoch
    assert steps == 14 and summary["epochs_trained"] == 2
    for name in ("train/loss", "train/lr", "train/grad_norm"):
        assert curves[name]["step"].to_list() == list(range(1, steps + 1)), name
    assert curves["train/loss"]["loss"][-1] == summary["train_loss"]
    for name in ("val/loss", "val/accuracy", "val/macro_f1"):  # at the end of each epoch
        assert curves[name]["step"].to_list() == [7, 14], name
    assert max(curves["val/macro_f1"]["macro_f1"]) == pytest.approx(summary["val_macro_f1"])  # the epoch kept



def test_a_batch_that_cannot_fit_stops_before_training_with_one_line(workspace, tmp_path):
    """10^10 texts a step: hundreds of terabytes of activations even for the tiny model. The stage says so before
    loading the weights, names the strategy's fixes, and writes nothing."""
    prepared, pretrained = workspace
    params = tmp_path / "params.yaml"
    params.write_text(to_yaml(tiny_params(batch_size=10**10)))
    done = subprocess.run([sys.executable, "-m", "components.finetune", "--params", params, "--prepared", prepared,
                           "--pretrained", pretrained, "--out", tmp_path / "classifier", "--curves",
                           tmp_path / "curves"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()
    need, free = (float(gb.replace(",", "")) for gb in re.findall(r"([\d,.]+) GB", line))
    assert line.startswith("gptpipe: error: full fine-tuning of a 12,275-parameter GPT") and need > 100_000 > free > 0
    assert "finetune.strategy=lora" in line and "finetune.batch_size" in line and "gpu work pool" in line
    assert not (tmp_path / "classifier").exists() and not (tmp_path / "curves").exists()

def test_early_stopping_ends_when_val_macro_f1_stops_improving(workspace, tmp_path):
    _, summary, _, _ = run(workspace, tmp_path, epochs=6, learning_rate=1e-9, patience=1)
    assert summary["epochs_trained"] == 2


def test_temperature_fitted_on_overconfident_logits_lowers_nll():
    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 4, (400,), generator=generator)
    right = torch.rand(400, generator=generator) < 0.7
    predicted = torch.where(right, truth, (truth + 1) % 4)
    logits = 8.0 * F.one_hot(predicted, 4).float() + 0.1 * torch.randn(400, 4, generator=generator)
    temperature = fit_temperature(logits, truth)
    assert temperature > 2
    assert F.cross_entropy(logits / temperature, truth) < F.cross_entropy(logits, truth)
    # at the fitted temperature the confidence is near the 70% accuracy
    assert torch.softmax(logits / temperature, dim=-1).max(dim=-1).values.mean() == pytest.approx(0.7, abs=0.05)


def test_training_batches_draw_real_windows_at_random_and_keep_short_texts_whole():
    # Text 0 fills 4 windows of 3 tokens, text 1 one window of 2; window k of text t holds the id 10 * t + k + 1.
    rows = [([[k + 1] * 3 for k in range(4)], 0), ([[11, 11]], 1)]
    draw = DrawWindows(2, pad=0, context_length=3, seed=0)
    seen = set()
    for _ in range(20):
        picked_ids, picked_mask, labels = draw(rows)
        assert picked_ids.shape == (2, 2, 3) and labels.tolist() == [0, 1]
        assert picked_mask[0].all(), "a text with 4 windows got a padding window"
        assert picked_ids[1, 0, :2].tolist() == [11, 11] and picked_mask[1].sum() == 2, "text 1 lost its window"
        seen.add(tuple(sorted(picked_ids[0, :, 0].tolist())))
    assert len(seen) > 3, "the same windows every time: not drawn at random"
    whole_ids, whole_mask, _ = DrawWindows(4, pad=0, context_length=3, seed=0)(rows)
    assert whole_ids.shape == (2, 4, 3) and whole_mask[0].sum() == 12 and whole_mask[1].sum() == 2


def test_per_batch_padding_gives_the_logits_of_padding_to_the_longest_text(workspace):
    tokenizer = Tokenizer.from_file(str(workspace[1] / "tokenizer.json"))
    texts = ["hi", " ".join(["refund invoice payment"] * 30), "login fails after reset", "crash " * 7]
    torch.manual_seed(0)
    classifier = Classifier(GPT(TINY), 3).eval()
    rows = text_windows(tokenizer, texts, TINY.context_length, max_chunks=4)
    padded_to_all = encode_chunks(tokenizer, texts, TINY.context_length, max_chunks=4)
    assert padded_to_all[0].shape[1:] == (4, TINY.context_length)
    with torch.no_grad():
        expected = classifier(*padded_to_all)
    per_batch = classify_windows(classifier, rows, padding_id(tokenizer), batch_size=2)
    assert [len(batch) for batch in batches_by_length(rows, 2)] == [2, 2]
    assert torch.allclose(per_batch, expected, atol=1e-5)


def test_training_batches_group_similar_lengths_and_change_every_epoch():
    lengths = [1, 100] * 32
    sampler = ShuffledBuckets(lengths, batch_size=8, seed=0)
    first, second = list(sampler), list(sampler)
    for batches in (first, second):
        assert sorted(i for batch in batches for i in batch) == list(range(64)) and len(batches) == len(sampler)
        assert all(len({lengths[i] for i in batch}) == 1 for batch in batches), "short and long texts mixed"
    assert first != second


def test_auto_precision_keeps_steps_of_few_tokens_in_fp32_on_a_cpu(monkeypatch):
    """bf16 autocast on a CPU with bf16 units only for steps big enough to pay for casting the weights."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(training, "cpu_has_fast_bf16", lambda: True)
    assert training.resolve_precision("auto", step_tokens=16 * 15) == "32-true"
    assert training.resolve_precision("auto", step_tokens=16 * 256) == "bf16-mixed"
    assert training.resolve_precision("auto") == "bf16-mixed"  # pre-training: full windows
    assert training.resolve_precision("bf16-mixed", step_tokens=16) == "bf16-mixed"  # asked for, kept
    monkeypatch.setattr(training, "cpu_has_fast_bf16", lambda: False)
    assert training.resolve_precision("auto", step_tokens=16 * 256) == "32-true"
