"""Published checkpoints in Hugging Face format import with the logits `transformers` computes for them."""

import copy
import json
import os
import subprocess
import sys

import polars as pl
import pytest
import torch
from tokenizers import Tokenizer

from components.checkpoints import resolve_foundation
from components.errors import InputError
from components.inference import load_backbone
from components.params import Params, to_yaml
from components.special_tokens import end_of_text_id, padding_id
from tests.components.hf_models import MIXED_LENGTHS, save_published
from tests.conftest import BIN, ROOT, TINY_PARAMS, TOPICS, gptpipe, make_project, repro, support_tickets

FAMILIES = ["gpt2", "llama", "qwen2"]


def encode(tokenizer: Tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask (B, T)."""
    rows = [encoding.ids for encoding in tokenizer.encode_batch(texts)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), padding_id(tokenizer))
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, one in enumerate(rows):
        ids[row, : len(one)], mask[row, : len(one)] = torch.tensor(one), 1
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_equal_transformers(family, tmp_path):
    theirs = save_published(family, tmp_path / family)
    foundation = resolve_foundation(str(tmp_path / family), "registry", context_length=64)
    ours = load_backbone(foundation.folder).eval()
    tokenizer = Tokenizer.from_file(str(foundation.folder / "tokenizer.json"))
    ids, mask = encode(tokenizer, MIXED_LENGTHS)
    assert 40 < ids.size(1) <= 64 and mask.sum(1).min() < 15  # texts of different lengths
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        logits = ours(ids)
        # the cached path: a prefix, then its continuation from the prefix's keys and values
        _, past = ours.hidden_states(ids[:, :7])
        continued = ours.lm_head(ours.hidden_states(ids[:, 7:], past)[0])
    for row, length in enumerate(mask.sum(1).tolist()):
        assert torch.allclose(logits[row, :length], expected[row, :length], atol=1e-4), family
        assert torch.allclose(continued[row, : length - 7], expected[row, 7:length], atol=1e-4), family
    if family == "llama":  # the tokenizer the task uses starts each text as the family expects
        assert ids[0, 0].item() == tokenizer.token_to_id("<|begin_of_text|>")
        assert end_of_text_id(tokenizer) == tokenizer.token_to_id("<|end_of_text|>")
    record = foundation.record
    assert record["architecture"] == theirs.config.architectures[0] and record["licence"] == "apache-2.0"
    assert set(record["files"]) == {"config.json", "model.safetensors", "tokenizer.json", "README.md"}


def test_the_window_is_capped_and_the_conversion_cached_by_content(tmp_path):
    folder = tmp_path / "gpt2"
    save_published("gpt2", folder)
    first = resolve_foundation(str(folder), "registry", context_length=32)
    assert json.loads((first.folder / "config.json").read_text())["context_length"] == 32  # of 64 positions
    assert resolve_foundation(str(folder), "registry", context_length=32) == first  # converted once
    wide = resolve_foundation(str(folder), "registry", context_length=4096)
    assert load_backbone(wide.folder).config.context_length == 64  # never past the checkpoint's positions
    save_published("gpt2", folder, seed=1)  # other weights at the same path
    changed = resolve_foundation(str(folder), "registry", context_length=32)
    assert changed.folder != first.folder
    assert changed.record["files"]["model.safetensors"] != first.record["files"]["model.safetensors"]
    assert changed.record["sha256"] != first.record["sha256"]


def test_an_s3_prefix_imports_the_same_model(tmp_path, bucket):
    import boto3

    folder = tmp_path / "llama"
    save_published("llama", folder)
    (folder / "pytorch_model.bin").write_bytes(b"a pickle that must never be fetched")
    client = boto3.client("s3")
    for file in folder.iterdir():
        client.upload_file(str(file), bucket, f"checkpoints/tiny-llama/{file.name}")
    local = resolve_foundation(str(folder), "registry", context_length=64)
    remote = resolve_foundation(f"s3://{bucket}/checkpoints/tiny-llama", "registry", context_length=64)
    assert remote.record["sha256"] == local.record["sha256"]  # the same converted weights
    assert "pytorch_model.bin" not in remote.record["files"] and remote.record["name"] == "tiny-llama"
    assert remote.record["files"]["model.safetensors"].strip('"')  # ETags identify S3 files


def hub_cache(tmp_path, family: str = "qwen2") -> tuple[dict, str]:
    """A Hub repository as huggingface_hub caches it (refs/main -> snapshots/<commit>), and the environment that
    reads only that cache."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-qwen2"
    save_published(family, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    return env, commit


def resolve_in_process(refs: list[str], env: dict, tmp_path) -> subprocess.CompletedProcess:
    """Resolve `refs` in a fresh interpreter (huggingface_hub reads its environment on import), printing each
    record as a JSON line; bad input ends it as the stages end, with exit status 2 and one line."""
    code = ("import json, sys; from components.checkpoints import resolve_foundation; "
            "from components.errors import exit_on_input_error; "
            "exit_on_input_error(lambda: [print(json.dumps(resolve_foundation(ref, 'registry', 64).record)) "
            "for ref in sys.argv[1:]])")
    return subprocess.run([sys.executable, "-c", code, *refs], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "GPTPIPE_CACHE": str(tmp_path / "cache"), **env})


def nothing_imported(tmp_path) -> bool:
    imported = tmp_path / "cache" / "imported"
    return not imported.exists() or not any(imported.iterdir())


def test_a_hub_reference_resolves_its_revision_from_the_cache_and_stops_with_one_line_when_it_cannot(tmp_path):
    env, commit = hub_cache(tmp_path)
    refs = ["hf:tiny-org/tiny-qwen2", "hf:tiny-org/tiny-qwen2@main", f"hf:tiny-org/tiny-qwen2@{commit}"]
    done = resolve_in_process(refs, env, tmp_path)
    assert done.returncode == 0, done.stderr
    for ref, line in zip(refs, done.stdout.splitlines(), strict=True):
        record = json.loads(line)
        assert (record["name"], record["revision"], record["uri"]) == ("tiny-org/tiny-qwen2", commit, ref)
    (tmp_path / "cache").rename(tmp_path / "earlier-cache")
    done = resolve_in_process(["hf:tiny-org/tiny-qwen2@v9"], env, tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "hf:tiny-org/tiny-qwen2@v9: the Hub cannot be reached and the revision is not in the local cache" \
        in done.stderr
    assert nothing_imported(tmp_path)


def test_a_hub_reference_is_downloaded_and_imported_and_then_imports_from_the_cache_offline(hub, tmp_path):
    theirs = save_published("llama", tmp_path / "tiny-llama")
    commit = hub.publish("tiny-org/tiny-llama", tmp_path / "tiny-llama")
    env = hub.environment(tmp_path / "hub")
    done = resolve_in_process(["hf:tiny-org/tiny-llama@main"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert (record["name"], record["revision"]) == ("tiny-org/tiny-llama", commit)
    [imported] = (tmp_path / "cache" / "imported").iterdir()
    tokenizer = Tokenizer.from_file(str(imported / "tokenizer.json"))
    ids, mask = encode(tokenizer, MIXED_LENGTHS)
    with torch.no_grad():
        logits = load_backbone(imported).eval()(ids)
        expected = theirs(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(logits[mask.bool()], expected[mask.bool()], atol=1e-4)
    # The Hub gone and the conversion thrown away: the revision and its files come from huggingface_hub's cache.
    hub.stop()
    (tmp_path / "cache").rename(tmp_path / "earlier-cache")
    again = resolve_in_process(["hf:tiny-org/tiny-llama@main"], env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == record


@pytest.mark.parametrize(("repo", "message"), [
    ("tiny-org/missing", "hf:tiny-org/missing: no such repository on the Hub"),
    ("tiny-org/pickled", "hf:tiny-org/pickled: no .safetensors weights (only pytorch_model.bin: pickles, refused"),
], ids=["missing", "pickles-only"])
def test_a_missing_or_pickle_only_hub_repository_stops_the_sources_stage_with_one_line(repo, message, hub, tmp_path):
    pickled = tmp_path / "pickled"
    save_published("gpt2", pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    hub.publish("tiny-org/pickled", pickled)
    pl.DataFrame(support_tickets()).write_csv(tmp_path / "labeled.csv")
    params = {"data": {"labeled": {"path": str(tmp_path / "labeled.csv")}}, "pretrain": {"init_from": f"hf:{repo}"}}
    (tmp_path / "params.yaml").write_text(to_yaml(Params.model_validate(params)))
    data, env = tmp_path / "data", {"GPTPIPE_CACHE": str(tmp_path / "cache"), **hub.environment(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-m", "components.data_sources", "--params", str(tmp_path / "params.yaml"),
                           "--out", str(data / "sources.json"), "--foundation", str(data / "foundation.json")],
                          cwd=tmp_path, capture_output=True, text=True, env={**os.environ, **env})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert message in done.stderr
    assert not data.exists() and nothing_imported(tmp_path)
    assert not list((tmp_path / "hub").rglob("*.bin"))  # the pickle was never fetched


def test_a_malformed_hub_reference_names_the_form_to_write():
    with pytest.raises(InputError, match="hf:a/b/c: not a Hub repository; write hf:ORG/NAME"):
        resolve_foundation("hf:a/b/c", "registry", 64)


def test_pickles_and_unknown_architectures_are_refused(tmp_path):
    pickled = tmp_path / "pickled"
    save_published("gpt2", pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    done = resolve_in_process([str(pickled)], {}, tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "only pytorch_model.bin: pickles, refused" in done.stderr
    other = tmp_path / "other"
    save_published("gpt2", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(InputError, match="architecture MambaForCausalLM is not supported; this pipeline imports "
                       "GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM"):
        resolve_foundation(str(other), "registry", 64)
    assert nothing_imported(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_published_checkpoint_of_each_family_runs_the_whole_pipeline_and_its_classifier_predicts(family, tmp_path):
    from components.params import load_params
    from components.register import register

    published = tmp_path / f"tiny-{family}"
    theirs = save_published(family, published)
    params = copy.deepcopy(TINY_PARAMS)
    params["pretrain"].update(init_from=str(published), max_steps=2)
    params["evaluate"].update(label_budgets=[], bootstrap_samples=10)  # no label-efficiency fine-tunes
    params["registry"] = {"uri": str(tmp_path / "registry")}
    project = make_project(tmp_path / "project", params)
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GPTPIPE_CACHE": str(tmp_path / "cache")}
    repro(project, {**os.environ, **env})
    source = json.loads((project / "data/foundation.json").read_text())
    assert source["architecture"] == theirs.config.architectures[0] and source["licence"] == "apache-2.0"
    pretrained = json.loads((project / "models/pretrained/metrics.json").read_text())
    assert pretrained["foundation"]["sha256"] == source["sha256"] and pretrained["steps"] == 2
    config = json.loads((project / "models/pretrained/config.json").read_text())
    assert config["positions"] == ("learned" if family == "gpt2" else "rotary")
    if family == "llama":  # each text starts as Llama expects
        tokenizer = Tokenizer.from_file(str(published / "tokenizer.json"))
        manifest = json.loads((project / "data/tokens/manifest.json").read_text())
        first = torch.from_file(str(project / "data/tokens" / manifest["train"]["file"]), size=2, dtype=torch.int16)
        assert first[0].item() == tokenizer.token_to_id("<|begin_of_text|>")
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert set(metrics["baselines"]) == {"tfidf_logreg", "zero_shot"}
    registered = register(load_params(project / "params.yaml"), project)
    assert (registered["version"], registered["alias"]) == (1, "champion")
    assert registered["foundation"]["continued_from"]["sha256"] == source["sha256"]  # the lineage names it
    texts = ["my invoice shows a double charge", "login fails after password reset"]
    done = gptpipe("predict", "--model", "bbc@champion", *texts, cwd=project, env=env)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [answer["text"] for answer in answers] == texts
    for answer in answers:
        assert set(answer["probs"]) == set(TOPICS) and answer["label"] in TOPICS
        assert abs(sum(answer["probs"].values()) - 1) < 1e-4
