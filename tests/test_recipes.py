"""The fair recipe search: its table, choices and prose on synthetic records with a known answer; the
two training options it measures (a normalisation learning rate, flip test-time augmentation)."""
import json

import pytest
import torch

from mnv2lib.analysis import recipes
from mnv2lib.analysis.prose.recipes import describe_recipe_selection
from mnv2lib.benchmarks.recipes import GRID, recipe_config, recipe_train_size
from mnv2lib.engine.train import TrainConfig, _param_groups, evaluate
from mnv2lib.models import build_model
from mnv2lib.runs.profiles import PROFILES

# recipe -> variant -> validation accuracy. "b" is the baseline's favourite, "m" the shared best
# (best mean), so a search that looked at the baseline alone would pick "b".
ACCURACY = {
    "quick": {"baseline": 0.50, "mish": 0.55, "triplet": 0.50, "cnsn": 0.45},
    "b": {"baseline": 0.56, "mish": 0.54, "triplet": 0.48, "cnsn": 0.38},
    "m": {"baseline": 0.54, "mish": 0.60, "triplet": 0.55, "cnsn": 0.45},
}


def _records(accuracy=ACCURACY, seeds=(0,)):
    return [{"variant": v, "recipe": r, "seed": s, "validation_accuracy": a + 0.01 * s,
             "validation_accuracy_flip": a + 0.01 * s + 0.02, "train_cpu_seconds": 100.0}
            for r, row in accuracy.items() for v, a in row.items() for s in seeds]


def test_the_shared_recipe_is_the_best_mean_not_the_baselines_favourite():
    table = recipes.recipe_selection(_records())
    assert list(table.index) == ["m", "quick", "b"]
    assert recipes.shared_recipe(table) == "m"
    assert recipes.best_recipes(table) == {"baseline": "b", "cnsn": "m", "mish": "m", "triplet": "m"}
    assert table.loc["m", "mean"] == pytest.approx((0.54 + 0.60 + 0.55 + 0.45) / 4)
    assert table.loc["m", "mean_flip"] - table.loc["m", "mean"] == pytest.approx(0.02)


def test_effects_under_the_current_shared_and_per_variant_recipes():
    effects = recipes.effects_by_recipe(recipes.recipe_selection(_records()), current="quick")
    assert effects.loc["mish", "current"] == pytest.approx(0.05)
    assert effects.loc["mish", "shared"] == pytest.approx(0.06)
    assert effects.loc["mish", "per_variant"] == pytest.approx(0.60 - 0.56)  # each at its own best
    assert effects.loc["cnsn", "own_recipe"] == "m"


def test_a_recipe_missing_a_variant_is_averaged_over_the_common_ones_only():
    partial = {**ACCURACY, "x": {"baseline": 0.9, "mish": 0.9}}  # no triplet or cnsn run: cannot win by it
    table = recipes.recipe_selection(_records(partial))
    assert set(recipes.variant_columns(table)) == {"baseline", "mish"}


def test_seeds_are_averaged_and_counted():
    table = recipes.recipe_selection(_records(seeds=(0, 1)))
    assert table.loc["m", "baseline"] == pytest.approx(0.545)
    assert set(table["seeds"]) == {2}
    assert table.loc["m", "mean_sd"] == pytest.approx(0.01 / 2 ** 0.5)  # per-seed means 0.535 and 0.545
    assert recipes.recipe_selection(_records())["mean_sd"].isna().all()
    text = describe_recipe_selection(table, recipes.effects_by_recipe(table, "m"), "m")
    assert "Its lead over quick is 3.5 pp; between seeds the criterion itself moves by a standard deviation of " \
           "up to 0.7 pp (the recipes with two or more seeds)" in text
    assert "mish +6.0 pp under m, +4.0 pp each at its own best" in text  # the profile's recipe is the pick


def test_records_are_read_from_a_directory_and_the_prose_names_the_choice(tmp_path):
    assert recipes.load_recipe_records(tmp_path / "missing") == []
    assert "No record" in describe_recipe_selection(recipes.recipe_selection([]), recipes.pd.DataFrame())
    for i, r in enumerate(_records()):
        (tmp_path / f"{i}.json").write_text(json.dumps(r))
    (tmp_path / "old.json").write_text(json.dumps({"recipe": "today", "validation_accuracy": 0.9}))
    table = recipes.recipe_selection(recipes.load_recipe_records(tmp_path))
    text = describe_recipe_selection(table, recipes.effects_by_recipe(table, "quick"), "quick")
    assert "picks **m** (53.5%)" in text
    assert "The profile's recipe (quick) scores 50.0%, 3.5 pp below" in text
    assert "baseline b (56.0%)" in text and "+2.0 pp on average" in text
    assert "mish +5.0 pp under quick, +6.0 pp under m, +4.0 pp each at its own best" in text


def test_the_profile_recipe_is_found_among_the_searched_ones_by_its_settings():
    records = [{"recipe": name, "train": recipe_config(name).to_dict(), "train_size": recipe_train_size(name)}
               for name in GRID]
    quick = PROFILES["quick"]
    assert recipes.current_recipe(records, quick.train.to_dict(), quick.train_size) in GRID
    lr = {**recipe_config("lr0.1").to_dict(), "curve_points": 10}
    assert recipes.current_recipe(records, lr, 20_000) == "lr0.1"
    assert recipes.current_recipe(records, {**lr, "lr": 0.3}, 20_000) is None
    # the same settings on other distinct images are another recipe
    assert recipes.current_recipe(records, lr, 40_000) is None
    assert recipes.current_recipe(records, recipe_config("distinct").to_dict(), 40_000) == "distinct"
    assert recipes.current_recipe(records, recipe_config("distinct").to_dict(), 20_000) is None
    # a first-round record (no train_size field) trained 20,000 images
    first_round = [{"recipe": "lr0.1", "train": recipe_config("lr0.1").to_dict()}]
    assert recipes.current_recipe(first_round, lr, 20_000) == "lr0.1"
    assert recipes.current_recipe(first_round, lr, None) is None
    text = describe_recipe_selection(recipes.recipe_selection(_records()), recipes.pd.DataFrame(), None)
    assert "none of the searched ones" in text


def test_every_grid_recipe_is_the_centre_with_its_overrides_only():
    centre = recipe_config("before").to_dict()
    for name, overrides in GRID.items():
        config = recipe_config(name).to_dict()
        assert {k for k in set(config) | set(centre) if config.get(k) != centre.get(k)} <= set(overrides)
    with pytest.raises(ValueError, match="recipe: got 'nope'; allowed values"):
        recipe_config("nope")


def test_the_normalisation_learning_rate_scales_only_parameters_without_weight_decay():
    model = build_model(num_classes=10, width_mult=0.25, stem="cifar_lite")
    groups = _param_groups(model, TrainConfig(norm_lr_mult=4.0))
    assert {(g["weight_decay"] > 0, g["lr_mult"]) for g in groups} == {(True, 1.0), (False, 4.0)}
    assert "norm_lr_mult" not in TrainConfig().to_dict()  # the default leaves run keys as they were
    assert TrainConfig(norm_lr_mult=2.0).to_dict()["norm_lr_mult"] == 2.0
    with pytest.raises(ValueError, match="norm_lr_mult"):
        TrainConfig(norm_lr_mult=0)


def test_flip_evaluation_averages_the_logits_of_each_image_and_its_mirror():
    torch.manual_seed(0)
    model = build_model(num_classes=10, width_mult=0.25, stem="cifar_lite").eval()
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (12,))
    mean, std = [0.5] * 3, [0.25] * 3
    x = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = (model(x) + model(x.flip(3))) / 2
    expected = torch.nn.functional.cross_entropy(logits, labels).item()
    got = evaluate(model, images, labels, mean, std, batch_size=5, device="cpu", flip=True)
    assert got["loss"] == pytest.approx(expected, rel=1e-4)
    assert got["accuracy"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    with pytest.raises(ValueError, match="flip"):
        evaluate(model, images, labels, mean, std, device="cpu", flip="yes")


def test_every_recipe_takes_the_same_steps_of_the_same_batch():
    """The grid compares recipes at one CPU budget: distinct images x epochs, and so steps, are equal."""
    steps = {name: recipe_train_size(name) // recipe_config(name).batch_size * recipe_config(name).epochs
             for name in GRID}
    assert max(steps.values()) - min(steps.values()) <= 1, steps  # a last partial batch is dropped per epoch
    assert recipe_train_size("before") == PROFILES["quick"].train_size  # the centre: the quick profile's images
    with pytest.raises(ValueError, match="recipe: got 'fast'; allowed values are"):
        recipe_train_size("fast")


def test_a_lead_is_judged_by_its_paired_interval_over_the_shared_seeds():
    records = _records(seeds=(0, 1))
    table = recipes.recipe_selection(records)
    lead = recipes.paired_lead(records, "m", "quick")
    assert lead["seeds"] == 2 and lead["difference"] == pytest.approx(0.035) and lead["ci_low"] > 0
    text = describe_recipe_selection(table, recipes.effects_by_recipe(table, "quick"), "quick", lead)
    assert "3.5 pp below; seed by seed over the 2 seeds both have, m minus quick is +3.5 pp [+3.5, +3.5] (95%), an " \
           "interval that excludes zero." in text
    # seed 1 reverses the order: the mean lead stays, the paired interval spans zero
    noisy = [dict(r, validation_accuracy=r["validation_accuracy"] - (0.06 if r["recipe"] == "m" and r["seed"] == 1
                                                                     else 0.0)) for r in records]
    lead = recipes.paired_lead(noisy, "m", "quick")
    assert lead["ci_low"] < 0 < lead["ci_high"]
    table = recipes.recipe_selection(noisy)
    text = describe_recipe_selection(table, recipes.effects_by_recipe(table, "quick"), "quick", lead)
    assert "an interval that includes zero: the search does not separate them." in text
    one_seed = recipes.recipe_selection(_records())
    lead = recipes.paired_lead(_records(), "m", "quick")
    text = describe_recipe_selection(one_seed, recipes.effects_by_recipe(one_seed, "quick"), "quick", lead)
    assert "3.5 pp below, and with one seed shared by the two recipes nobody knows whether that is more" in text
    assert recipes.paired_lead(records, "m", "m") is None and recipes.paired_lead(records, "m", None) is None


def test_recipes_are_ranked_on_the_seeds_every_recipe_has():
    """A second seed for some recipes (with its own validation split) must not move them against the others."""
    records = _records(seeds=(0,)) + [dict(r, seed=1, validation_accuracy=r["validation_accuracy"] - 0.10)
                                      for r in _records() if r["recipe"] == "m"]
    table = recipes.recipe_selection(records)
    assert table.attrs["ranked_on"] == (0,) and recipes.shared_recipe(table) == "m"  # not sunk by its hard seed 1
    assert table.loc["m", "baseline"] == pytest.approx(0.54) and table.loc["m", "seeds"] == 2
    assert table.loc["m", "mean_sd"] > 0.05  # the spread still uses every seed
    text = describe_recipe_selection(table, recipes.effects_by_recipe(table, "m"), "m")
    assert "compared on seed 0, which every recipe has" in text and "For the recipes with one seed" in text