#!/usr/bin/env python3
"""Which familiarity check? Compares out-of-distribution scores on a run's trained models (prints figures).

    .venv/bin/python benchmarks/detectors.py --summary summary.json --data ../shared/datasets/PBC_dataset_normal_DIB \
        [--state-dir .bloodcell] [--images 600] [--non-cells 100] [--json detectors.json]

Every detector is fitted the way the models' own check is (``bloodcell.train.calibrate``): on the same sample
of the training split, its threshold at the validation score under which 95% of the validation cells fall;
then the share flagged is measured on a stratified test sample, untouched and under each shift of
``benchmarks/shifts.py`` (and on the non-cell images). Higher is better on the shifts; about 5% on the
untouched cells is the design.

- ``shipped``: what the models carry (Mahalanobis distance to the nearest class mean, shared covariance, of
  the image statistics and of each convolutional block's pooled maps, each standardised on validation, the
  largest);
- ``blocks only``: the same without the image statistics;
- ``image statistics``: the same on the image statistics alone;
- ``last block``: on the last block only;
- ``penultimate``: Mahalanobis on the classifier's input features (Lee et al., 2018, as usually applied);
- ``knn``: distance to the k-th nearest training feature, L2-normalised classifier inputs (Sun et al., 2022);
- ``energy``: minus the log-sum-exp of the logits (Liu et al., 2020);
- ``max softmax``: one minus the largest softmax probability (the baseline).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
from scipy.special import logsumexp

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import shifts as shift_benchmark  # noqa: E402

from bloodcell import arrays, config, familiarity, feeding, predict, train  # noqa: E402

KNN_K = 10
CLASSIFIER = "probabilities"  # the Dense softmax layer every trained model ends in (bloodcell.models)
BATCH = 64


def classifier_layer(model: keras.Model) -> tuple[keras.layers.Layer, keras.Model | None]:
    """The softmax Dense layer, and the nested model holding it (VGG16's head) or None."""
    for layer in model.layers:
        if layer.name == CLASSIFIER:
            return layer, None
        if isinstance(layer, keras.Model) and any(inner.name == CLASSIFIER for inner in layer.layers):
            return layer.get_layer(CLASSIFIER), layer
    raise ValueError(f"model {model.name} has no {CLASSIFIER!r} layer")


def feature_model(model: keras.Model) -> keras.Model:
    """Outputs: the image statistics and each block's pooled maps (as the models' check reads them), then the
    classifier's input."""
    blocks = familiarity.pooled_features(model)
    dense, nested = classifier_layer(model)
    if nested is None:
        penultimate = dense.input
    else:  # VGG16's head is a model of its own, reading the last block's maps: run it up to the classifier
        inner = keras.Model(nested.inputs, dense.input)
        penultimate = inner(familiarity.feature_layers(model)[-1].output)
    return keras.Model(model.inputs, [*blocks.outputs, penultimate])


Scorer = Callable[[list[np.ndarray]], np.ndarray]


def fit_detectors(features: list[np.ndarray], labels: np.ndarray, val: list[np.ndarray], dense) -> dict[str, Scorer]:
    """Each detector fitted on training ``features`` (blocks..., penultimate) and standardised on ``val``."""
    n_classes = int(labels.max()) + 1
    *block_train, penultimate_train = features
    blocks = familiarity.standardise(
        [familiarity.fit_block(f, labels, n_classes) for f in block_train], val[:-1]
    )  # fmt: skip
    image, convolutional, last = blocks[:1], blocks[1:], blocks[-1:]
    penultimate = familiarity.fit_block(penultimate_train, labels, n_classes)
    kernel, bias = (np.asarray(w, np.float64) for w in dense.get_weights())
    bank = normalised(penultimate_train)

    def logits(f: list[np.ndarray]) -> np.ndarray:
        return np.asarray(f[-1], np.float64) @ kernel + bias

    return {
        "shipped": lambda f: familiarity.block_scores(blocks, f[:-1]),
        "blocks only": lambda f: familiarity.block_scores(convolutional, f[1:-1]),
        "image statistics": lambda f: familiarity.block_scores(image, f[:1]),
        "last block": lambda f: familiarity.block_scores(last, f[-2:-1]),
        "penultimate": lambda f: np.log(penultimate.distances(f[-1])),
        "knn": lambda f: kth_distance(normalised(f[-1]), bank, KNN_K),
        "energy": lambda f: -logsumexp(logits(f), axis=1),
        "max softmax": lambda f: -np.exp(logits(f) - logsumexp(logits(f), axis=1, keepdims=True)).max(axis=1),
    }


def normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def kth_distance(queries: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """Euclidean distance of each (normalised) query to its k-th nearest row of ``bank``."""
    squared = 2.0 - 2.0 * queries @ bank.T
    return np.sqrt(np.maximum(np.partition(squared, k - 1, axis=1)[:, k - 1], 0.0))


def compare(model: keras.Model, run: shift_benchmark.RunImages, profile: config.Profile) -> dict[str, dict]:
    """Per detector, the share flagged under each condition (threshold: 95% of validation below it)."""
    size = int(model.input_shape[1])
    arrays_uri = run.arrays_uri.rsplit("/", 1)[0] + f"/{size}"
    x_train, y_train = arrays.load(arrays_uri, "train")
    rows = train.familiarity_sample(y_train, profile.familiarity_fit_images, profile.seed)
    extract = feature_model(model)
    fitted_on = feeding.predict_outputs(extract, x_train[rows], BATCH)
    val = feeding.predict_outputs(extract, arrays.load(arrays_uri, "val")[0], BATCH)
    detectors = fit_detectors(fitted_on, y_train[rows], val, classifier_layer(model)[0])
    by_condition = {c: feeding.predict_outputs(extract, images[size], BATCH) for c, images in run.images.items()}
    result = {}
    for name, score in detectors.items():
        threshold = familiarity.flag_threshold(score(val), profile.familiarity_flag_share)
        result[name] = {c: float((score(f) > threshold).mean()) for c, f in by_condition.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shift_benchmark.add_run_arguments(parser)
    parser.add_argument("--profile", default="laptop", help="the run's profile (its familiarity settings)")
    args = parser.parse_args()
    run = shift_benchmark.run_images(args)
    profile = config.resolve(args.profile)
    results = {}
    conditions = list(run.images)
    for model_name, metrics in run.metrics.items():
        if model_name == "ensemble":
            continue  # the combined model has no features of its own: its members are compared
        model, _ = predict.load(metrics["model_uri"])
        results[model_name] = compare(model, run, profile)
        print(f"\n{model_name}: share flagged (threshold: {profile.familiarity_flag_share:.0%} of validation above)")
        print(f"{'detector':12}" + "".join(f"{c[:10]:>11}" for c in conditions))
        for detector, shares in results[model_name].items():
            print(f"{detector:12}" + "".join(f"{shares[c]:11.1%}" for c in conditions), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
