"""`make demo`: CLIP, a dVAE and DALL·E trained together on the built-in shapes data, evaluated and reported.

    python -m experiments.demo --workdir runs/demo
    python -m experiments.demo --workdir runs/demo_tiny --config experiments/configs/demo.py:tiny

Each stage trains through the shared trainer, into its own directory of --workdir; re-running
the command reuses finished stages and resumes an interrupted one from its last checkpoint:
  clip/   a small CLIP (experiments/train_clip.py); at the end, zero-shot colour and shape with
          prompt ensembling (clip_jax.zeroshot, the ImageNet code) and image-text retrieval, on
          held-out images of colour-shape pairs seen in training ("validation") and never seen
          ("heldout");
  dvae/   the dVAE (experiments/train_dvae.py): reconstruction PSNR and codebook perplexity;
  dalle/  DALL·E (experiments/train_dalle.py): the caption tokenizer, the shapes encoded once by
          the dVAE, the transformer;
  judge/  an independent supervised CNN that names the colour and the shape in an image
          (experiments/demo_judge.py), scored on real images it never saw.
Then, for held-out captions of seen and of never-seen colour-shape pairs, DALL·E draws N samples
each, CLIP reranks them and keeps k, and the judge says whether each shows the caption's colour
and shape: faithfulness before reranking (a random choice: the mean over all N) and after.
Writes report.json, report.md, generations.png, reconstructions.png and loss_curves.png.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from clip_jax import zeroshot
from clip_jax.api import CLIPBundle
from common import sharding
from common.data import shapes
from common.metrics import configure_logging, progress_bar
from common.trainer import restore_eval_params, restore_eval_variables
from dalle_jax.generate import generate, load_run
from experiments import demo_judge, demo_report, train_clip, train_dalle, train_dvae

log = logging.getLogger("demo")

GRID_SCALE = 4  # generated and reconstructed 32 px tiles are shown 4x larger


def run_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What restoring a finished run of `config` needs: its trainer and optim settings."""
    return {"trainer": config.trainer.to_dict(), "optim": config.optim.to_dict()}


def train_stage(name: str, config: ml_collections.ConfigDict, workdir: Path,
                driver: Callable[[Any, Path], dict]) -> tuple[dict[str, Any], float]:
    """(summary, seconds): a finished stage's summary.json, or the driver's run (resuming if interrupted)."""
    path = workdir / name / "summary.json"
    if path.is_file():
        summary = json.loads(path.read_text())
        if summary.get("steps") == config.trainer.total_steps and not summary.get("preempted"):
            log.info("%s: finished in an earlier run, reusing %s", name, path)
            return summary, 0.0
    log.info("%s: training %d steps in %s", name, config.trainer.total_steps, workdir / name)
    started = time.perf_counter()
    summary = driver(config, workdir / name)
    return summary, time.perf_counter() - started


def held_out_captions(split: str, count: int) -> list[dict[str, Any]]:
    """The first `count` distinct colour-shape pairs of a split (seed 0, as every model's evaluation),
    each with the caption of its first image: {"caption", "color_id", "shape_id"}."""
    dataset = shapes.ShapesDataset(split, 100 * count + 1000, shapes.ShapesConfig(image_size=8))
    chosen: dict[tuple[int, int], dict[str, Any]] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        pair = (item["color_id"], item["shape_id"])
        chosen.setdefault(pair, {"caption": item["caption"], "color_id": pair[0], "shape_id": pair[1]})
        if len(chosen) == count:
            break
    return list(chosen.values())


def restore_clip(config: ml_collections.ConfigDict, workdir: Path, mesh: jax.sharding.Mesh) -> CLIPBundle:
    task = train_clip.make_task(config, mesh)
    variables = restore_eval_variables(task, run_record(config), workdir, mesh)  # with a ResNet's batch_stats
    return CLIPBundle(task.model, variables, task.config, f"trained in {workdir}")


def text_similarity(clip: CLIPBundle, mesh: jax.sharding.Mesh) -> dict[str, float]:
    """Mean cosine similarity of CLIP's text features of "a {colour} {shape}" between captions that differ
    only in the shape, and only in the colour: near 1, the text tower no longer tells them apart."""
    prompts = [f"a {color} {shape}" for color in shapes.COLORS for shape in shapes.SHAPES]
    features = zeroshot.embed_texts(clip, prompts, mesh=mesh).reshape(len(shapes.COLORS), len(shapes.SHAPES), -1)
    by_color = np.einsum("csd,ctd->cst", features, features)  # (C, S, S): same colour, shapes s and t
    by_shape = np.einsum("csd,esd->sce", features, features)  # (S, C, C): same shape, colours c and e

    def off_diagonal_mean(similarities: np.ndarray) -> float:
        n = similarities.shape[-1]
        return float((similarities.sum() - np.trace(similarities, axis1=1, axis2=2).sum())
                     / (similarities.shape[0] * n * (n - 1)))

    return {"clip_text_cosine_other_shape": off_diagonal_mean(by_color),
            "clip_text_cosine_other_color": off_diagonal_mean(by_shape)}


def judge_samples(trained: Any, clip: CLIPBundle, judge: demo_judge.JudgeTask, judge_variables: Any,
                  items: list[dict[str, Any]], gen: ml_collections.ConfigDict, desc: str) -> dict[str, Any]:
    """N samples per caption, ordered by CLIP score (best first), and the judge's verdict on each.

    Returns {"captions", "images": float (C, N, H, W, 3), "order": (C, N) candidate index at each rank,
    "clip_scores": (C, N) CLIP scores in rank order, "color_ok", "shape_ok": bool (C, N), "seen": the judge's
    colour and shape names (C, N)}.
    """
    images, order, scores, color_ok, shape_ok, seen = [], [], [], [], [], []
    sampling = dict(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, guidance_scale=gen.guidance_scale)
    for c, item in enumerate(progress_bar(items, desc, unit="caption")):
        out = generate(trained, [item["caption"]], n=gen.candidates, keep=gen.candidates, clip=clip,
                       seed=gen.seed * 100_003 + c, batch_size=gen.candidates, **sampling)
        candidates = out["images"][0]  # (N, H, W, 3), best CLIP score first
        colors, kinds = judge.predict(judge_variables, candidates)
        images.append(candidates)
        order.append(out["kept"][0])
        scores.append(np.sort(out["scores"][0])[::-1])  # (N,) CLIP scores, best first
        color_ok.append(colors == item["color_id"])
        shape_ok.append(kinds == item["shape_id"])
        seen.append([f"{shapes.COLORS[a]} {shapes.SHAPES[b]}" for a, b in zip(colors, kinds)])
    return {"captions": [item["caption"] for item in items], "images": np.stack(images), "order": np.stack(order),
            "clip_scores": np.stack(scores), "color_ok": np.stack(color_ok), "shape_ok": np.stack(shape_ok), "seen": seen}


def faithfulness(judged: dict[str, Any], keep: int) -> dict[str, float]:
    """Fractions of images whose colour and shape (and each alone) the judge finds as captioned: a random
    choice (the expectation over all N candidates) and the k CLIP ranks best."""
    both = judged["color_ok"] & judged["shape_ok"]  # (C, N), CLIP's rank order
    out = {}
    for name, ok in (("", both), ("_color", judged["color_ok"]), ("_shape", judged["shape_ok"])):
        out[f"random_choice{name}"] = float(ok.mean())
        out[f"reranked{name}"] = float(ok[:, :keep].mean())
    out["clip_score_random_choice"] = float(judged["clip_scores"].mean())  # CLIP's own view of the same choice
    out["clip_score_reranked"] = float(judged["clip_scores"][:, :keep].mean())
    return out


def evaluate_dvae(config: ml_collections.ConfigDict, workdir: Path, mesh: jax.sharding.Mesh,
                  judge: demo_judge.JudgeTask, judge_variables: Any, count: int) -> tuple[float, np.ndarray]:
    """(the judge's accuracy on dVAE reconstructions of `count` real "validation" images, (2 count, H, W, 3)
    originals interleaved with their reconstructions): how well the judge reads decoded images."""
    task = train_dvae.make_task(config)
    params = restore_eval_params(task, run_record(config), workdir, mesh)
    dataset = shapes.ShapesDataset("validation", count, shapes.ShapesConfig(image_size=config.image_size))
    items = [dataset[i] for i in range(count)]
    originals = np.stack([it["image"] for it in items])  # (n, S, S, 3) uint8
    _, reconstructions = jax.jit(task.reconstruct)(params, originals)
    reconstructions = np.asarray(reconstructions)
    colors, kinds = judge.predict(judge_variables, reconstructions)
    correct = (colors == [it["color_id"] for it in items]) & (kinds == [it["shape_id"] for it in items])
    pairs = np.stack([originals / 255.0, reconstructions], axis=1).reshape(-1, *originals.shape[1:])
    return float(correct.mean()), pairs


def main_results(summaries: dict[str, dict], judged: dict[str, dict], gen: ml_collections.ConfigDict,
                 judge_on_reconstructions: float) -> dict[str, Any]:
    """The report's numbers, flat: the issue's keys first."""
    report: dict[str, Any] = {}
    for split, suffix in (("validation", ""), ("heldout", "_unseen")):
        zs = summaries["clip"][f"shapes_{split}"]
        for kind in ("color", "shape"):
            report[f"zeroshot_{kind}_top1{suffix}"] = zs[f"zeroshot_{kind}_top1"]
            report[f"zeroshot_{kind}_chance{suffix}"] = zs[f"chance_{kind}_top1"]
        for direction in ("image_to_text", "text_to_image"):
            for k in (1, 5):
                report[f"retrieval_{direction}_r{k}{suffix}"] = zs[f"retrieval_{direction}_R@{k}"]
    dvae = summaries["dvae"]["eval"]
    report.update(dvae_psnr=dvae["psnr"], dvae_mse=dvae["mse"], dvae_codebook_perplexity=dvae["perplexity"],
                  dvae_dead_codes=dvae["dead_codes"])
    report["dalle_eval_loss"] = summaries["dalle"]["eval"]["loss"]
    for group, prefix in (("seen", "faithfulness_"), ("unseen", "faithfulness_unseen_")):
        report.update({prefix + k: v for k, v in faithfulness(judged[group], gen.keep).items()})
    judge = summaries["judge"]
    report["judge_accuracy"] = (judge["validation"]["accuracy"] + judge["heldout"]["accuracy"]) / 2
    for kind in ("color", "shape"):
        report[f"judge_{kind}_accuracy"] = (judge["validation"][f"{kind}_accuracy"]
                                            + judge["heldout"][f"{kind}_accuracy"]) / 2
    report["judge_accuracy_seen"] = judge["validation"]["accuracy"]
    report["judge_accuracy_unseen"] = judge["heldout"]["accuracy"]
    report["judge_accuracy_on_reconstructions"] = judge_on_reconstructions
    return report


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Every stage, the evaluations and the report (see the module docstring); returns report.json's content."""
    started = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh("data_parallel")
    config = config.copy_and_resolve_references()  # a copy: the DALL·E stage is pointed at the dVAE stage's run
    config.dalle.dvae.workdir = str((workdir / "dvae").resolve())

    summaries, seconds = {}, {}
    stages = (("clip", train_clip.run), ("dvae", train_dvae.train), ("dalle", train_dalle.run),
              ("judge", demo_judge.train))
    for name, driver in stages:
        summaries[name], seconds[name] = train_stage(name, config[name], workdir, driver)

    gen_started = time.perf_counter()
    clip = restore_clip(config.clip, workdir / "clip", mesh)
    trained = load_run(workdir / "dalle", mesh)
    judge = demo_judge.make_task(config.judge)
    judge_variables = restore_eval_variables(judge, run_record(config.judge), workdir / "judge", mesh)
    judged = {group: judge_samples(trained, clip, judge, judge_variables, held_out_captions(split, config.generation.captions),
                                   config.generation, f"generating ({group} pairs)")
              for group, split in (("seen", "validation"), ("unseen", "heldout"))}
    on_reconstructions, pairs = evaluate_dvae(config.dvae, workdir / "dvae", mesh, judge, judge_variables,
                                              config.judge.eval_examples)
    seconds["generation_and_judging"] = time.perf_counter() - gen_started

    report = main_results(summaries, judged, config.generation, on_reconstructions)
    report.update(text_similarity(clip, mesh))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report.update(seconds_total=time.perf_counter() - started, cpu_seconds_total=usage.ru_utime + usage.ru_stime,
                  seconds={k: round(v, 1) for k, v in seconds.items()})
    demo_report.write_grids(workdir, judged, config.generation, pairs[:32], GRID_SCALE)
    demo_report.write_loss_curves(workdir, [name for name, _ in stages])
    demo_report.write(workdir, report, config)
    return report


_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).parent / "configs" / "demo.py"), "The demo's config file, optionally with ':tiny'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where every stage, the report and the pictures go.")


def main(argv: list[str]) -> None:
    del argv
    configure_logging()
    # Restoring a stage compiles the programs its training compiled (e.g. the sharded init), and a
    # re-run compiles them all again: a persistent cache under the workdir turns those into reads.
    jax.config.update("jax_compilation_cache_dir", str(Path(_WORKDIR.value) / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    report = run(_CONFIG.value, _WORKDIR.value)
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}, indent=2))
    print(f"Wrote {_WORKDIR.value}/report.md and report.json, generations.png, reconstructions.png, loss_curves.png")


if __name__ == "__main__":
    app.run(main)
