"""`make demo`'s pipeline end to end at test size (experiments/configs/demo.py:tiny), and the quick-start
notebook run on what it wrote."""

import json
import math
import os
from pathlib import Path

import matplotlib
import pytest
from PIL import Image

from experiments import demo
from experiments.configs.demo import get_config

NOTEBOOK = Path(__file__).parent.parent / "experiments" / "notebooks" / "quickstart.ipynb"
REQUIRED = ("zeroshot_color_top1", "zeroshot_shape_top1", "retrieval_image_to_text_r1", "retrieval_text_to_image_r1",
            "dvae_psnr", "dvae_codebook_perplexity", "faithfulness_random_choice", "faithfulness_reranked",
            "faithfulness_unseen_reranked", "judge_accuracy", "seconds_total")


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    return workdir, demo.run(get_config("tiny"), workdir)


def test_report_has_every_number(tiny_demo):
    workdir, _ = tiny_demo
    on_disk = json.loads((workdir / "report.json").read_text())
    for key in REQUIRED:
        assert isinstance(on_disk[key], (int, float)) and math.isfinite(on_disk[key]), key
    fractions = [k for k in on_disk if k.startswith(("zeroshot_", "retrieval_", "faithfulness_", "judge_"))]
    assert len(fractions) > 20
    for key in fractions:
        assert 0.0 <= on_disk[key] <= 1.0, (key, on_disk[key])
    assert on_disk["dvae_codebook_perplexity"] >= 1.0 and on_disk["seconds_total"] > 0
    assert set(on_disk["targets"]) >= {"zeroshot_color_top1 >= 0.9", "judge_accuracy >= 0.95"}
    markdown = (workdir / "report.md").read_text()
    assert all(f"`{key}`" in markdown for key in REQUIRED if key != "seconds_total")


def test_clip_beats_chance(tiny_demo):
    _, report = tiny_demo
    assert report["zeroshot_color_top1"] > 2 * report["zeroshot_color_chance"]
    assert report["retrieval_text_to_image_r5"] > 5 / get_config("tiny").clip.zeroshot_shapes.num_examples


def test_pictures_are_big_enough_to_see(tiny_demo):
    workdir, _ = tiny_demo
    gen = get_config("tiny").generation
    with Image.open(workdir / "generations.png") as grid:
        tile = demo.GRID_SCALE * 32
        assert grid.width >= 2 * gen.keep * tile  # CLIP's best k beside k random, shown 4x larger
        assert grid.height >= 2 * gen.grid_captions * tile  # a row per caption, seen and never-seen pairs
    for name in ("reconstructions.png", "loss_curves.png"):
        with Image.open(workdir / name) as image:
            assert image.width >= 256


def test_rerun_reuses_finished_stages(tiny_demo):
    workdir, report = tiny_demo

    def must_not_train(config, workdir):
        raise AssertionError("a finished stage was trained again")

    config = get_config("tiny")
    summary, seconds = demo.train_stage("clip", config.clip, workdir, must_not_train)
    assert seconds == 0.0 and summary["shapes_validation"]["zeroshot_color_top1"] == report["zeroshot_color_top1"]


def test_quickstart_notebook_runs_on_the_demo(tiny_demo, monkeypatch):
    """Executes the notebook's code cells in order, as Jupyter would, on the tiny demo's checkpoints."""
    workdir, _ = tiny_demo
    monkeypatch.setenv("DEMO_WORKDIR", str(workdir))
    monkeypatch.setenv("DEMO_CONFIG", "tiny")
    matplotlib.use("Agg")
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    namespace = {"__name__": "__main__"}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{NOTEBOOK.name}[{cells.index(cell)}]", "exec"), namespace)  # noqa: S102
    assert namespace["result"]["images"].shape[:2] == (3, get_config("tiny").generation.keep)
    assert set(namespace["predictions"]) == {"color", "shape"}
    import matplotlib.pyplot as plt

    plt.close("all")
    assert os.environ["DEMO_CONFIG"] == "tiny"
