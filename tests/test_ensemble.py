"""The combined model: its layers and probabilities, the choices made on validation data only, and
storing, registering and reloading it."""

from __future__ import annotations

import io
import json
import uuid

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from bloodcell import (
    arrays,
    calibration,
    decisions,
    ensemble,
    evaluate,
    layers,
    predict,
    registry,
    selection,
    storage,
    tracking,
)
from bloodcell.arrays import decode_resized
from bloodcell.runstore import ModelRecord, RunStore
from conftest import SHARED_DATA

CLASSES = ["dark", "light"]


def tiny_member(size: int, seed: int) -> keras.Model:
    """A small untrained classifier of uint8 images whose output depends on where things are in the image."""
    keras.utils.set_random_seed(seed)
    images = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255)(images)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.Flatten()(keras.layers.AveragePooling2D(4)(x))
    return keras.Model(images, keras.layers.Dense(3, activation="softmax")(x), name=f"member{seed}")


def fixed_batch(size: int = 24, n: int = 5) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def numpy_symmetries(images: np.ndarray) -> list[np.ndarray]:
    """The 8 right-angle symmetries, from numpy: 4 rotations of the images and of their mirror images."""
    return [np.rot90(x, k, axes=(1, 2)) for x in (images, images[:, :, ::-1]) for k in range(4)]


def test_dihedral_images_are_the_eight_symmetries():
    images = fixed_batch(n=2)
    stacked = keras.ops.convert_to_numpy(layers.DihedralImages()(images)).reshape(8, 2, 24, 24, 3)
    expected = numpy_symmetries(images)
    assert len({s.tobytes() for s in expected}) == 8
    assert sorted(s.tobytes() for s in stacked) == sorted(s.tobytes() for s in expected)
    np.testing.assert_array_equal(stacked[0], images)  # symmetry-major: the images as given first


@pytest.mark.parametrize(
    ("method", "tf_method", "antialias"), [("bilinear", "bilinear", True), ("area", "area", False)]
)
def test_shrinking_matches_tensorflow(method, tf_method, antialias):
    import tensorflow as tf

    images = np.asarray(decode_resized(str(next((SHARED_DATA / "monocyte").iterdir())), [96])[0])[None]
    for size in (64, 48, 32):
        ours = keras.ops.convert_to_numpy(layers.ResizeImages(size, method)(images)).astype(int)
        resized = tf.image.resize(images.astype("float32"), (size, size), method=tf_method, antialias=antialias)
        theirs = np.clip(np.round(resized.numpy()), 0, 255).astype(int)
        assert ours.shape == (1, size, size, 3) and np.abs(ours - theirs).max() <= 1  # float rounding at .5
        assert np.abs(ours - theirs).mean() < 0.01


def test_combined_probabilities_are_the_mean_of_the_members_with_tta():
    members = {"a": tiny_member(24, 1), "b": tiny_member(16, 2), "c": tiny_member(12, 3)}
    tta = {"a": True, "b": True, "c": False}
    resize: dict[str, str | None] = {"a": None, "b": "area", "c": "bilinear"}
    model = ensemble.combined_model(members, tta, 24, resize)
    images = fixed_batch()

    def member_probabilities(name: str) -> np.ndarray:
        member, method = members[name], resize[name]
        shrink = layers.ResizeImages(member.input_shape[1], method) if method else None
        x = keras.ops.convert_to_numpy(shrink(images)) if shrink else images
        variants = numpy_symmetries(x) if tta[name] else [x]
        return np.mean([member.predict_on_batch(v) for v in variants], axis=0)

    expected = np.mean([member_probabilities(n) for n in members], axis=0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.predict_on_batch(images)), expected, atol=1e-6)
    assert decisions.inference_batch(model) == decisions.IMAGES_PER_BATCH // 8
    assert decisions.inference_batch(ensemble.combined_model(members, dict.fromkeys(members, False), 24)) == 128


def test_tta_is_kept_only_where_it_raises_validation_accuracy():
    y_val = np.array([0, 1, 1, 0])
    right, wrong = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]]), np.array([[0.4, 0.6]] * 4)
    helped = np.stack([wrong] + [right] * 7)  # wrong as given, right in the other 7 symmetries
    unchanged = np.stack([right] * 8)
    decisions = selection.choose_tta({"helped": helped, "unchanged": unchanged}, y_val)
    assert decisions["helped"]["use"] and decisions["helped"]["plain"]["accuracy"] == 0.5
    assert decisions["helped"]["tta"]["accuracy"] == 1.0
    assert not decisions["unchanged"]["use"]  # no gain: 8x the inference for nothing


def test_members_are_chosen_by_validation_accuracy_ties_to_the_smaller_set():
    y_val = np.array([0, 0, 1, 1])
    good = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])  # 3 of 4
    also_good = np.array([[0.7, 0.3], [0.4, 0.6], [0.1, 0.9], [0.2, 0.8]])  # 3 of 4, other mistakes
    bad = np.full((4, 2), 0.5) + np.array([-0.1, 0.1])  # always class 1
    candidates = selection.choose_members({"good": good, "also_good": also_good, "bad": bad}, y_val)
    assert candidates[0]["members"] == ["good", "also_good"] and candidates[0]["accuracy"] == 1.0
    assert len(candidates) == 7
    tied = selection.choose_members({"good": good, "copy": good.copy()}, y_val)
    assert tied[0]["members"] == ["good"]  # the pair is no better: the single model


def test_description_names_each_members_branch():
    tta, resize = {"cnn1": True, "cnn2": False, "vgg16": True}, {"cnn1": "area", "cnn2": None, "vgg16": None}
    assert selection.describe(["cnn1", "cnn2", "vgg16"], tta, resize) == (
        "the average of cnn1 (shrunk by area, averaged over the 8 symmetries), cnn2 and "
        "vgg16 (averaged over the 8 symmetries)"
    )


# --- a run's combined model from stored members, against the real object store and MLflow ---


def channel_member(channel: int, size: int, name: str) -> keras.Model:
    """Says 'light' when colour ``channel`` of the image is bright on average, with fixed weights."""
    images = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(images))
    dense = keras.layers.Dense(2, activation="softmax", name="probabilities")
    model = keras.Model(images, dense(x), name=name)
    kernel = np.zeros((3, 2), "float32")
    kernel[channel] = [-20, 20]
    dense.set_weights([kernel, np.array([10, -10], "float32")])
    return model


def colours(rng: np.random.Generator, labels: np.ndarray, label_channel: int) -> np.ndarray:
    """One colour per image: ``label_channel`` bright for class 1 and dark for class 0, the others random."""
    values = rng.uniform(0, 1, (len(labels), 3))
    values[:, label_channel] = np.where(labels == 1, rng.uniform(0.6, 1, len(labels)), rng.uniform(0, 0.4, len(labels)))
    return (values * 255).astype(np.uint8)


def uniform_images(colours: np.ndarray, size: int) -> np.ndarray:
    return np.broadcast_to(colours[:, None, None, :], (len(colours), size, size, 3)).copy()


def store_arrays(uri: str, subsets: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    for subset, (x, y) in subsets.items():
        for part, values in (("x", x), ("y", y.astype(np.int32))):
            buffer = io.BytesIO()
            np.save(buffer, values)
            storage.upload_bytes(buffer.getvalue(), storage.join(uri, f"{subset}_{part}.npy"))


@pytest.fixture()
def stored_run(services):
    """A run with two stored members: 'red' right on validation, 'green' right on test (its labels follow
    the green channel there)."""
    run_id = f"ensemble-{uuid.uuid4().hex[:8]}"
    store = RunStore(services["bucket"], run_id)
    storage.ensure_bucket(services["bucket"])
    rng = np.random.default_rng(3)
    y_val, y_test = np.tile([0, 1], 20), np.tile([0, 1], 20)
    val, test = colours(rng, y_val, label_channel=0), colours(rng, y_test, label_channel=1)
    trained = []
    for name, channel, size in (("red", 0, 16), ("green", 1, 24)):
        arrays_uri = f"gs://{services['bucket']}/arrays/{run_id}/{size}"
        store_arrays(
            arrays_uri,
            {
                "val": (uniform_images(val, size), y_val),
                "calibration": (uniform_images(val, size), y_val),
                "test": (uniform_images(test, size), y_test),
            },
        )
        trained.append(
            ModelRecord(
                model=name,
                model_uri=store.save_model(channel_member(channel, size, f"built_as_{name}"), name),
                classes=CLASSES,
                image_size=size,
                epochs=1,
                train_seconds=1.0,
                params=8,
                arrays_uri=arrays_uri,
                mlflow_run_id=None,
                mlflow_model_uri=None,
            )
        )
    return {"trained": trained, "store": store, "run_id": run_id}


def test_members_are_chosen_on_validation_only_and_evaluated_like_trained_models(stored_run, monkeypatch):
    read = []
    load = arrays.load

    def recording_load(uri: str, subset: str):
        read.append(subset)
        return load(uri, subset)

    monkeypatch.setattr(arrays, "load", recording_load)
    store = stored_run["store"]
    tracker = tracking.Tracker(store, "evaluate")
    record = ensemble.build(stored_run["trained"], store, tracker)
    combined = record.combination
    assert combined is not None
    assert read == ["val", "calibration"]  # choices on val, the rules on calibration: never the test split
    assert combined.members == ["red"] and combined.tta == {"red": False}  # colour means: symmetries change nothing
    assert combined.resize == {"red": "bilinear"}  # shrunk from 24 to 16 px; the methods tie on uniform images
    assert combined.description == "red (shrunk by bilinear) alone"
    assert set(combined.selection["resize"]["red"]) == {"bilinear", "area"}
    assert record.image_size == 24 and combined.val_accuracy == 1.0
    assert {c["members"][0] for c in combined.selection["candidates"] if len(c["members"]) == 1} == {"red", "green"}

    results = evaluate.evaluate(stored_run["trained"], store, tracker)
    assert list(results) == ["red", "green", "ensemble"]
    assert results["ensemble"]["accuracy"] == results["red"]["accuracy"] < 0.8  # chosen on val, so wrong on test
    assert results["green"]["accuracy"] == 1.0
    assert results["ensemble"]["members"] == ["red"] and results["ensemble"]["inference_images_per_second"] > 0
    assert storage.exists(store.metrics_uri("ensemble"))
    assert ensemble.build(stored_run["trained"], store, tracker) == record  # stored: reused


def test_saved_registered_and_reloaded_it_predicts_the_same(stored_run, services, capsys):
    mlflow.set_tracking_uri(services["env"]["MLFLOW_TRACKING_URI"])
    store = stored_run["store"]
    parent = tracking.parent_run(f"test-{uuid.uuid4().hex[:8]}", store)
    tracker = tracking.Tracker(store, "evaluate")
    record = ensemble.build(stored_run["trained"], store, tracker)
    combined = record.combination
    assert (
        combined is not None
        and record.mlflow_run_id
        and record.mlflow_model_uri
        and record.mlflow_model_uri.startswith("models:/m-")
    )
    run = MlflowClient().get_run(record.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["bloodcell.model"] == "ensemble"
    assert run.data.params["members"] == "red" and run.data.metrics["val_accuracy"] == 1.0
    members = {info.model: ensemble.load_member(store, info) for info in stored_run["trained"]}
    built_here = ensemble.combined_model(
        {"red": members["red"]}, combined.tta, 24, combined.resize, calibration.Calibrated(**record.calibration)
    )
    candidate = registry.Candidate(record.mlflow_model_uri, "ensemble", 0.5, stored_run["run_id"])
    version = registry.register_best(candidate)["version"]

    images = uniform_images(colours(np.random.default_rng(9), np.tile([0, 1], 8), label_channel=0), 24)
    expected = keras.ops.convert_to_numpy(built_here.predict_on_batch(images))
    for uri in (record.model_uri, record.mlflow_model_uri, f"models:/{registry.REGISTERED_MODEL}/{version}"):
        model, classes = predict.load(uri)  # Keras safe mode: no Lambda layer, only registered ones
        assert classes == CLASSES and model.input_shape == (None, 24, 24, 3)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.predict_on_batch(images)), expected)
        layer = calibration.calibration_layer(model)  # calibrated exactly as built, wherever it was loaded from
        assert layer is not None
        assert (layer.temperature, layer.refer_below) == (
            record.calibration["temperature"],
            record.calibration["refer_below"],
        )

    files = [str(path) for path in sorted((SHARED_DATA / "platelet").iterdir())[:3]]
    predict.main(f"models:/{registry.REGISTERED_MODEL}/{version}", files, as_json=True)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["predictions"]) == 3 and result["first_prediction_seconds"] > 0  # speed: bench_serving.py
    assert list(result["refer_below"].values()) == record.calibration["refer_below"] and result["calibrated"]
    assert not result["familiarity_check"] and result["unfamiliar"] is None  # members without the check: none
    for item in result["predictions"]:
        assert set(item["probabilities"]) == set(CLASSES) and item["class"] in CLASSES
        assert abs(sum(item["probabilities"].values()) - 1) < 1e-4 and isinstance(item["refer"], bool)
