"""Run a study end to end: data, models, every experiment per model (cached), then the report.

Layout of the output folder::

    OUT/models/<name>/     training runs (see :mod:`sslens.study.models`)
    OUT/cache/<model>/     one stored result per experiment (see :mod:`sslens.study.cache`)
    OUT/figures/*.png      every report figure
    OUT/results.json       every number in the report, plus the config, seed and environment
    OUT/report.html        the self-contained report

Nothing the reader sees is touched until every stage has finished and every section has been
drawn; then the figures, ``results.json`` and ``report.html`` are written in full beside the old
ones and replaced together (:func:`publish_outputs`). A study that fails midway, even while
writing (a full disk), therefore leaves the previous outputs byte-identical, while the stages it
finished stay cached for the next run. The output folder is locked while a study runs.

Under ``torchrun --nproc_per_node=N -m sslens study ...`` every rank runs every stage: models
are trained with DDP by all ranks, the explanation experiments split their images across the
ranks and gather the maps (:mod:`sslens.study.sharding`), and the other experiments (kNN,
linear probe, t-SNE) run whole on every rank, which costs no extra time and keeps the ranks
from idling in a collective (NCCL aborts a wait of over 10 minutes) while one of them trains a
probe. Rank 0 alone reads and writes the cache, writes the figures, ``results.json`` and
``report.html``, and shows progress; the ranks share one file system.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from sslens.atomic import atomic_write_bytes, directory_lock, fsync_directory, json_bytes, jsonable
from sslens.data.base import load_split
from sslens.device import resolve_device
from sslens.distributed import barrier, broadcast_object, init_distributed, world
from sslens.errors import UserError
from sslens.hashing import json_sha256
from sslens.report.html import Section, Table, environment_info, format_cell, render_html
from sslens.store import build_method
from sslens.study.cache import CACHE_VERSION, StageCache, StageResult
from sslens.study.compare import comparisons, conclusion
from sslens.study.context import StudyContext
from sslens.study.experiments import EXPERIMENTS, stage_inputs
from sslens.study.explainers import build_explainer
from sslens.study.models import prepare_model, random_init_model
from sslens.study.progress import StudyProgress
from sslens.study.sections import tradeoff_columns, tradeoff_rows
from sslens.study.spec import RANDOM_INIT, StudyConfig
from sslens.train.loop import train


@dataclass
class StudyOutcome:
    """Where the study wrote its report and what its trade-off table says."""

    report: Path
    results: Path
    tradeoff: list[dict[str, Any]]
    #: the trade-off rows' keys and their headers, in table order
    tradeoff_columns: dict[str, str]
    seconds: float


def _per_model(config: StudyConfig) -> list[str]:
    return [name for name in config.experiments
            if EXPERIMENTS.get(name).run is not None and EXPERIMENTS.get(name).scope == "model"]


def _per_study(config: StudyConfig) -> list[str]:
    return [name for name in config.experiments if EXPERIMENTS.get(name).scope == "study"]


#: The cache folder of the study-level stages (not a valid model name, so no model's).
STUDY_STAGES = "_study"


def run_study(
    config: StudyConfig, out: str | Path, *, progress: bool | str = "auto", stream: TextIO | None = None
) -> StudyOutcome:
    """Run ``config`` into the folder ``out`` and return the outcome.

    Args:
        config: from :func:`~sslens.study.config.load_study_config`.
        out: output folder (created if needed); re-running into it reuses finished models and
            cached stages.
        progress: a rich bar (True), plain lines (False) or a bar only on a terminal ("auto").
        stream: where the progress display goes (stdout by default).
    """
    started = time.perf_counter()
    out = Path(out)
    device = init_distributed(resolve_device(config.device))
    main = world().is_main
    with contextlib.ExitStack() as held:
        # Rank 0 writes the outputs, so rank 0 holds the folder; a refusal reaches every rank.
        refusal = None
        if main:
            try:
                held.enter_context(directory_lock(out, "running a study"))
            except UserError as error:
                refusal = str(error)
        refusal = broadcast_object(refusal)
        if refusal is not None:
            raise UserError(refusal)
        return _run(config, out, device, started, progress, stream)


def _run(config: StudyConfig, out: Path, device: torch.device, started: float, progress, stream) -> StudyOutcome:
    main = world().is_main
    cache = StageCache(out / "cache")
    # A study of study-level experiments alone (``sslens groundtruth``) trains none of its models.
    with_models = bool(_per_model(config))
    count = (len(config.models) + int(config.random_init)) * with_models
    total = 2 + len(config.models) * with_models + len(_per_model(config)) * count + len(_per_study(config))
    with StudyProgress(total, bar=progress, stream=stream, quiet=not main) as display:
        with display.stage("loading the dataset"):
            dataset = config.dataset
            splits = {
                split: load_split(
                    dataset["name"], split, data_dir=dataset["data_dir"], image_size=dataset["image_size"],
                    options={**dataset["options"], **dataset[f"{split}_options"]}, device=device,
                )
                for split in ("train", "test")
            }

        def train_fn(train_config, resume: bool, overwrite: bool) -> Path:
            with display.paused():
                return train(dataclasses.replace(train_config, progress=display.use_bar),
                             resume=resume, overwrite=overwrite)

        ctx = StudyContext(config, device, splits["train"], splits["test"], out=out, train_fn=train_fn,
                           say=display.message)
        if with_models:
            _prepare_models(ctx, display)
        for name in _per_model(config):
            inputs = stage_inputs(ctx, name)
            for model in ctx.models.values():
                key = json_sha256({**inputs, "weights": model.weights_sha256, "version": CACHE_VERSION})
                ctx.outputs.setdefault(name, {})[model.name] = _cached_stage(ctx, cache, display, name, model, key)
        for name in _per_study(config):
            key = json_sha256({**stage_inputs(ctx, name), "version": CACHE_VERSION})
            ctx.outputs[name] = {"study": _cached_stage(ctx, cache, display, name, None, key)}
        with display.stage("writing the report"):
            if main:
                write_report(ctx, out)
            # Every rank returns once the report exists.
            barrier()
    return StudyOutcome(
        out / "report.html", out / "results.json", tradeoff_rows(ctx), tradeoff_columns(ctx),
        time.perf_counter() - started,
    )


def _prepare_models(ctx: StudyContext, display: StudyProgress) -> None:
    """Train, reuse or load every model of the study (and add the random-init floor)."""
    config = ctx.config
    for spec in config.models:
        if spec.train is not None:
            # Before minutes of training: an explainer option the architecture cannot take
            # (a Grad-CAM layer it lacks, say) fails now.
            check_explainers(config, spec.name, build_method(_architecture(spec.train)).encoder("pooled"))
    for spec in config.models:
        with display.stage(f"model {spec.name}"):
            ctx.models[spec.name] = prepare_model(
                spec, ctx.out / "models", ctx.device, train_fn=ctx.train_fn, say=display.message
            )
        if spec.train is None:
            check_explainers(config, spec.name, ctx.models[spec.name].encoder("pooled", ctx.test_data))
    if config.random_init:
        template = next((spec.name for spec in config.models if spec.train is not None), config.models[0].name)
        ctx.models[RANDOM_INIT] = random_init_model(ctx.models[template], config.seed, ctx.device)


def _cached_stage(ctx: StudyContext, cache: StageCache, display: StudyProgress, name: str, model, key: str) -> StageResult:
    """Stage ``name`` of ``model`` (None: a study-level stage) from the cache, or run and stored."""
    main = world().is_main
    folder = STUDY_STAGES if model is None else model.name
    # Rank 0 looks up the cache for all ranks: they must run or skip a stage together
    # (explanation stages are collective), whatever rank 0 has written meanwhile.
    result = broadcast_object(cache.get(folder, name, key) if main else None)
    with display.stage(name if model is None else f"{name} · {model.name}", cached=result is not None):
        if result is None:
            result = _run_stage(ctx, name, model)
            if main:
                cache.put(folder, name, key, result)
    return result


def _architecture(train_config) -> dict:
    """What :func:`sslens.store.build_method` needs to build ``train_config``'s untrained method."""
    options = dict(train_config.method_options)
    return {"method": train_config.method, "method_options": options, "backbone": train_config.backbone,
            "backbone_options": train_config.backbone_options}


def check_explainers(config: StudyConfig, model: str, encoder: torch.nn.Module) -> None:
    """Build every explainer the study's experiments will run on ``encoder``, with the study's
    options, so that an option this model cannot take fails before any stage runs."""
    names = {name for name in config.explainers}
    for experiment in _per_model(config):
        names |= set(EXPERIMENTS.get(experiment).explainers_used(config.settings.get(experiment, {})))
    for name in sorted(names):
        try:
            build_explainer(name, encoder, config.explainers.get(name, {}), seed=config.seed,
                            mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        except UserError as error:
            raise UserError(f"Model {model!r}: {error}") from error


def _run_stage(ctx: StudyContext, name: str, model) -> StageResult:
    experiment = EXPERIMENTS.get(name)
    # Global RNG seeded per stage too, for any library code that draws from it.
    torch.manual_seed(ctx.seed)
    result = experiment.run(ctx, model, ctx.config.settings.get(name, {}), ctx.config.samples.get(name))
    # NaN becomes None now, as it will be after a cache round trip: a cached rerun is identical.
    return StageResult(jsonable(result.results), result.arrays)


def write_report(ctx: StudyContext, out: Path) -> tuple[Path, Path]:
    """Draw every section, then write figures, ``results.json`` and ``report.html`` (atomically)."""
    sections, figures, tables = [], {}, {}
    for name in ctx.config.experiments:
        experiment = EXPERIMENTS.get(name)
        content = experiment.section(ctx, ctx.outputs.get(name, {}), ctx.config.settings.get(name, {}))
        for stem, _, png in content.figures:
            figures[f"{name}-{stem}.png"] = png
        tables[name] = [{"caption": t.caption, "columns": t.columns, "rows": t.rows} for t in content.tables]
        sections.append(Section(
            experiment.title, experiment.reading_aid,
            figures=[(caption, png) for _, caption, png in content.figures], tables=content.tables,
            notes=content.notes, interactive=content.interactive,
        ))
    pairs = comparisons(ctx)
    environment = environment_info(device=str(ctx.device), seed=ctx.seed)
    if world().distributed:
        environment["processes"] = world().size
    results = {
        "title": ctx.config.title,
        "seed": ctx.seed,
        "device": str(ctx.device),
        "models": {name: model.describe(out) for name, model in ctx.models.items()},
        "experiments": {
            name: {model: output.results for model, output in outputs.items()}
            for name, outputs in ctx.outputs.items()
        },
        "tables": tables,
        "tradeoff": tradeoff_rows(ctx),
        "comparisons": pairs,
        "conclusion": conclusion(ctx, pairs),
        "figures": [f"figures/{file}" for file in figures],
        "config": ctx.config.to_dict(),
        "environment": environment,
    }
    # Rendered before anything is written: an error here must leave the old figures and
    # results.json as well as the old report, not new ones beside a stale report.
    document = render_html(
        title=ctx.config.title, sections=sections, config=ctx.config.to_dict(), environment=environment
    )
    staged = {f"figures/{file}": png for file, png in figures.items()}
    staged["results.json"] = json_bytes(results)
    staged["report.html"] = document.encode("utf-8")
    publish_outputs(out, staged)
    return out / "report.html", out / "results.json"


#: What a study shows its reader, replaced together by :func:`publish_outputs`.
OUTPUTS = ("figures", "results.json", "report.html")


def publish_outputs(out: Path, files: dict[str, bytes]) -> None:
    """Replace the study's figures, ``results.json`` and ``report.html`` as one unit.

    Everything is written in full into ``OUT/.outputs-new`` first (a full disk fails there and
    touches nothing the reader sees); only then are the old outputs moved aside and the new ones
    renamed into place, which needs no space, and on any error the old ones are moved back. A
    study therefore never leaves new results beside an old report.
    """
    staging, previous = out / ".outputs-new", out / ".outputs-old"
    for folder in (staging, previous):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        for name, data in files.items():
            atomic_write_bytes(staging / name, data)
        (staging / "figures").mkdir(exist_ok=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous.mkdir()
    try:
        for name in OUTPUTS:
            if (out / name).exists():
                os.replace(out / name, previous / name)
        for name in OUTPUTS:
            os.replace(staging / name, out / name)
    except BaseException:
        for name in OUTPUTS:
            if (previous / name).exists():
                if (out / name).is_dir():
                    shutil.rmtree(out / name)
                os.replace(previous / name, out / name)
        raise
    finally:
        fsync_directory(out)
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(previous, ignore_errors=True)


def format_tradeoff(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    """The trade-off table as aligned plain text, for the terminal (``columns``: key → header)."""
    table = Table(list(columns.values()), [[row[k] for k in columns] for row in rows])
    cells = [table.columns] + [[format_cell(v) for v in row] for row in table.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(table.columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)
