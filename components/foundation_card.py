"""The foundation's model card: what it read (sources, licences, documents, tokens), for how long, and how well
it predicts each source's held-out text."""

from components.model import GPTConfig


def perplexity_cell(summary: dict, source: str) -> str:
    perplexity = summary["val_perplexity_per_source"].get(source)
    return "too little held out" if perplexity is None else f"{perplexity:.1f}"


def model_card(summary: dict, config: GPTConfig) -> str:
    corpus = summary["corpus"]
    rows = "\n".join(
        f"| {source} | {row['licence']} | {row['files']} | {row['documents']:,} | {row['bytes'] / 1e6:,.1f} | "
        f"{row['train_tokens']:,} | {row.get('held_out_tokens', 0):,} | "
        f"{perplexity_cell(summary, source)} |"
        for source, row in sorted(corpus.items()))
    continued = summary["continued_from"]
    history = (f"Continued from {continued['name']} ({continued.get('version') or continued.get('path')}); "
               "tokens seen and wall time include that run's." if continued else "Trained from random weights.")
    return f"""# {summary['name']}: a broad foundation GPT

A {summary['n_params']:,}-parameter decoder ({config.n_layer} layers, {config.n_head} heads, width {config.d_model},
context {config.context_length}, byte-level BPE of {config.vocab_size:,} tokens), pre-trained on next-token
prediction over broad English text. gptpipe continues it on each task's own text, then fine-tunes a classifier.

## Training
- Tokens seen: {summary['tokens_seen']:,} ({summary['steps']:,} steps in this run, {summary['train_tokens']:,} tokens)
- Wall time: {summary['wall_seconds'] / 3600:.2f} h on {summary['device']}, precision {summary['precision']},
  {summary['tokens_per_second']:,.0f} tokens/s
- {history}
- Held-out perplexity, all sources: {summary['val_perplexity']:.1f}

## Corpus
Per source: licence, files, documents, MB of file, training tokens, held-out tokens (a hashed
share of each source's documents, never trained on) and held-out perplexity.

| source | licence | files | documents | MB | train tokens | held-out tokens | perplexity |
|---|---|---:|---:|---:|---:|---:|---:|
{rows}

`lineage.json` names every corpus file with its sha256 and the parameters of the run.

## Limits
A small model trained briefly: it writes locally fluent English, not facts to rely on. It carries the biases of
its sources (an old Wikipedia dump, public-domain books, US government texts). Use it as a starting point for
fine-tuning, not for generation.
"""
