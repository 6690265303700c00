"""Bootstrap intervals of classification scores: of one classifier on a test split (evaluate), and of the
difference between two classifiers on the same test texts (the promotion gate), resampled together so that the
texts both get right or both get wrong cancel out."""

import numpy as np


def resampled_class_scores(truth: np.ndarray, predicted: np.ndarray, classes: int,
                           picks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy (R,) and per-class F1 (R, classes) of each resample, `picks` (R, n) indexing the test items (class
    indices); all R confusion matrices are counted in one bincount."""
    samples, n = picks.shape
    cells = (np.arange(samples)[:, None] * classes + truth[picks]) * classes + predicted[picks]
    matrices = np.bincount(cells.ravel(), minlength=samples * classes * classes).reshape(samples, classes, classes)
    hits = np.diagonal(matrices, axis1=1, axis2=2)
    # F1 = 2 TP / (true count + predicted count); 0 where a class is in neither, as sklearn's zero_division=0.
    denominators = matrices.sum(axis=2) + matrices.sum(axis=1)
    f1 = np.divide(2 * hits, denominators, out=np.zeros(hits.shape), where=denominators > 0)
    return hits.sum(axis=1) / n, f1


def resampled_scores(truth: np.ndarray, predicted: np.ndarray, classes: int,
                     picks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro-F1 of each resample."""
    accuracy, f1 = resampled_class_scores(truth, predicted, classes, picks)
    return accuracy, f1.mean(axis=1)


def resample_picks(n: int, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def interval95(values: np.ndarray) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def bootstrap_intervals(truth: np.ndarray, predicted: np.ndarray, classes: int, samples: int,
                        seed: int) -> dict[str, list[float]]:
    """95% percentile intervals of accuracy and macro-F1 over `samples` resamples of the test items."""
    accuracy, macro_f1 = resampled_scores(truth, predicted, classes, resample_picks(len(truth), samples, seed))
    return {"accuracy": interval95(accuracy), "macro_f1": interval95(macro_f1)}


def paired_difference_intervals(truth: np.ndarray, first: np.ndarray, second: np.ndarray, classes: int,
                                samples: int, seed: int) -> dict[str, list[float]]:
    """95% percentile intervals of first minus second (accuracy and macro-F1), both scored on each resample of
    the same test items (a paired bootstrap)."""
    picks = resample_picks(len(truth), samples, seed)
    first_accuracy, first_f1 = resampled_scores(truth, first, classes, picks)
    second_accuracy, second_f1 = resampled_scores(truth, second, classes, picks)
    return {"accuracy": interval95(first_accuracy - second_accuracy), "macro_f1": interval95(first_f1 - second_f1)}
