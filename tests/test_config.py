"""Profiles and overrides."""

import pytest

from bloodcell import config


def test_profiles_cover_the_original_settings_on_gpu():
    gpu = config.resolve("gpu")
    assert gpu.model_names == ["cnn1", "cnn2", "vgg16"]
    assert gpu.model("cnn1").image_sizes() == gpu.model("cnn2").image_sizes() == {128}
    assert gpu.model("vgg16").image_sizes() == {224}
    assert gpu.split_ratio == (0.65, 0.05, 0.15, 0.15) and gpu.seed == 777
    assert config.resolve("smoke").max_images_per_class > 0
    assert config.resolve("laptop").max_images_per_class == 0


def test_overrides_are_typed():
    profile = config.resolve(
        "laptop",
        '{"cnn1.epochs": "5", "cnn2.augment": "false", "seed": 1, '
        '"split_ratio": "0.7,0.1,0.1,0.1", "vgg16.transfer.learning_rate": "3e-4", "vgg16.scratch.width": "0.5"}',
    )
    cnn1, cnn2, vgg16 = (profile.model(name) for name in ("cnn1", "cnn2", "vgg16"))
    assert isinstance(cnn1, config.ModelConfig) and isinstance(cnn2, config.ModelConfig)
    assert isinstance(vgg16, config.TransferOrScratch)
    assert cnn1.epochs == 5 and cnn2.augment is False and profile.seed == 1
    assert profile.split_ratio == (0.7, 0.1, 0.1, 0.1)
    assert vgg16.transfer.learning_rate == 3e-4 and vgg16.scratch.width == 0.5  # each recipe its own settings
    assert config.PROFILES["laptop"].models["cnn1"] == config.resolve("laptop").model("cnn1")  # untouched
    assert config.resolve("laptop").flat_params()["cnn1.epochs"] != "5"
    assert profile.flat_params()["vgg16.scratch.width"] == "0.5" and profile.flat_params()["cnn1.epochs"] == "5"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"cnn1.epoch": 3}, r"unknown setting 'cnn1.epoch'; settings are: .*cnn1.epochs"),
        ({"cnn1.epochs": "many"}, r"setting 'cnn1.epochs': cannot use 'many'; expected int"),
        ({"split_ratio": "0.5,0.5"}, r"four positive fractions \(train, val, calibration, test\) summing to 1"),
        ({"cnn1": 3}, r"'cnn1' is a group; set one of its fields"),
        ({"vgg16.epochs": 3}, r"unknown setting 'vgg16.epochs'; settings are: .*vgg16.scratch.epochs.*vgg16.transfer"),
        ({"models": 3}, r"unknown setting 'models'"),
        ({"name": "x"}, r"unknown setting 'name'"),
        ({"cnn2.lr_schedule": "step"}, r"lr_schedule 'step' is not one of: plateau, cosine"),
    ],
)
def test_bad_overrides_say_what_to_do(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.resolve("smoke", overrides)


def test_unknown_profile_and_assignment_syntax():
    with pytest.raises(config.ConfigError, match="unknown profile 'fast'; choose one of: smoke, laptop, gpu"):
        config.resolve("fast")
    assert config.parse_assignments(["cnn1.epochs=5"]) == {"cnn1.epochs": "5"}
    with pytest.raises(config.ConfigError, match="--set expects KEY=VALUE"):
        config.parse_assignments(["cnn1.epochs"])


def test_image_sizes_are_what_the_models_need():
    assert config.resolve("laptop").image_sizes() == [64, 96]
    assert config.resolve("smoke").image_sizes() == [32, 48, 96]
    assert config.resolve("gpu").image_sizes() == [128, 224]


def test_a_model_name_must_make_a_task_a_parameter_and_a_folder():
    entry = config.PROFILES["smoke"].model("cnn1")
    for bad in ("CNN", "cnn_1", "ensemble", "seed", "1cnn"):
        with pytest.raises(config.ConfigError, match="not allowed: use lower-case letters and digits"):
            config.Profile(name="x", models={bad: entry})
    with pytest.raises(config.ConfigError, match="profile 'smoke' has no model 'cnn3'; its models: cnn1, cnn2, vgg16"):
        config.resolve("smoke").model("cnn3")
