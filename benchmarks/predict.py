"""Prediction throughput of a registered classifier: texts/s through `components.predict` (tokenize, batch,
forward, softmax) against the bare forward pass on the same pre-encoded batches (each text read as the
model's `max_chunks` windows), in the same run; prints JSON.

    python benchmarks/predict.py --model bbc@champion [--registry registry] [--texts 256]
"""

import argparse
import json
import time

import torch

from components.inference import PREDICT_BATCH, encode_chunks
from components.params import load_params
from components.predict import load_registered, predict
from components.sources import builtin_bbc_news_dir


def sample_texts(count: int) -> list[str]:
    files = sorted(builtin_bbc_news_dir().rglob("*.txt"))
    return [files[i % len(files)].read_bytes().decode("utf-8", errors="replace") for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bbc@champion")
    parser.add_argument("--registry", default=None, help="default: registry.uri in params.yaml")
    parser.add_argument("--texts", type=int, default=256)
    args = parser.parse_args()
    classifier, manifest = load_registered(args.registry or load_params().registry.uri, args.model)
    texts = sample_texts(args.texts)
    list(predict(classifier, texts[:PREDICT_BATCH]))  # warm-up

    started = time.perf_counter()
    rows = list(predict(classifier, texts))
    pipeline_seconds = time.perf_counter() - started

    context = classifier.model.backbone.config.context_length
    batches = [encode_chunks(classifier.tokenizer, texts[i : i + PREDICT_BATCH], context, classifier.max_chunks)
               for i in range(0, len(texts), PREDICT_BATCH)]
    started = time.perf_counter()
    with torch.no_grad():
        for ids, mask in batches:
            classifier.model(ids, mask)
    forward_seconds = time.perf_counter() - started

    print(json.dumps({
        "benchmark": "predict", "model": f"{manifest['name']}:{manifest['version']}", "texts": len(rows),
        "batch_size": PREDICT_BATCH, "context_length": context, "max_chunks": classifier.max_chunks,
        "threads": torch.get_num_threads(),
        "texts_per_second": round(len(rows) / pipeline_seconds, 1),
        "bare_forward_texts_per_second": round(len(texts) / forward_seconds, 1),
        "pipeline_vs_bare_forward": round(forward_seconds / pipeline_seconds, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
