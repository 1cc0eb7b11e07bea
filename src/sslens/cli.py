"""The ``sslens`` command line: thin commands over the library.

Heavy libraries (torch, torchvision, matplotlib, scikit-learn) are imported inside the commands,
so ``sslens --help`` answers at once. A :class:`~sslens.errors.UserError` is printed as one
paragraph on stderr and exits with status 2, without a traceback. To add a command, write a
function decorated with ``@app.command()`` that parses options and calls library code.
"""

from __future__ import annotations

import errno
import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from sslens.errors import SslensWarning, UserError

app = typer.Typer(
    name="sslens",
    help="Train self-supervised image models (SimCLR, MoCo v2, SwAV) and explain their representations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: rich's tables cut long values (a list of components, a path) with "…" at 80
    # columns; click's formatter wraps every word onto the next line instead.
    rich_markup_mode=None,
)

USER_ERROR_EXIT = 2


def _print_version(value: bool) -> None:
    if value:
        from sslens.version import __version__

        typer.echo(f"sslens {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the sslens version and exit.",
    )] = False,
) -> None:
    """Train self-supervised image models (SimCLR, MoCo v2, SwAV) and explain their representations."""


@app.command("train", short_help="Train a self-supervised model into a run directory.")
def train_command(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c",
        help="YAML config file, or the name of a packaged one (e.g. simclr-synthetic). "
        "Flags and --set override its values. With --resume and no --config, RUN/config.yaml is used.",
    )] = None,
    preset: Annotated[str | None, typer.Option(
        help="A packaged recipe for --method (default simclr), e.g. cifar10-fast: the config "
        "<method>-<preset>. Instead of --config.",
    )] = None,
    method: Annotated[str | None, typer.Option(help="Self-supervised method: simclr, moco or swav.")] = None,
    backbone: Annotated[str | None, typer.Option(help="Encoder, e.g. resnet18-cifar, resnet50, resnet-tiny.")] = None,
    data: Annotated[str | None, typer.Option(help="Dataset source: synthetic, cifar10 or imagefolder.")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Folder holding the dataset (cifar10, imagefolder).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Side of the square training views in pixels.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training split.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per optimiser step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (after linear warm-up, then cosine decay).")] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd, lars, adam or adamw.")] = None,
    device: Annotated[str | None, typer.Option(help="auto (CUDA if available), cpu, cuda or cuda:N.")] = None,
    out: Annotated[str | None, typer.Option(help="Run directory (default runs/<method>-<data>).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of data order, augmentations and initialisation.")] = None,
    compile: Annotated[bool | None, typer.Option(
        "--compile/--no-compile", help="torch.compile the model (not the optimiser step).", show_default=False,
    )] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue the run in --out from its latest checkpoint (bitwise-exact on the CPU in deterministic mode).",
    )] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace a run already in --out; its files are deleted only after the new run's first checkpoint.",
    )] = False,
    allow_changes: Annotated[bool, typer.Option(
        help="With --resume: continue with a config that differs from the checkpoint's (optimiser, "
        "learning rate, batch size, data, views); without it such a resume is refused.",
    )] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE",
        help="Set any config key (repeatable); values are YAML, dotted keys reach nested options: "
        "--set method_options.temperature=0.2 --set knn_every=5. Applied after the other flags.",
    )] = None,
) -> None:
    """Train a self-supervised model; writes config.yaml, log.jsonl, checkpoints/ and model/ in the run directory."""
    from sslens.store import RunDir
    from sslens.train.config import load_config, parse_assignment
    from sslens.train.loop import nothing_to_resume, train

    flags = {
        "method": method, "backbone": backbone, "data": data, "data_dir": data_dir,
        "image_size": image_size, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "optimizer": optimizer, "device": device, "out": out, "seed": seed, "compile": compile,
    }
    overrides = {key: value for key, value in flags.items() if value is not None}
    for text in set_ or []:
        key, value = parse_assignment(text)
        overrides[key] = value
    if preset is not None:
        config = _preset_config(preset, method or "simclr", config)
    if resume and config is None:
        if "out" not in overrides:
            raise UserError("--resume needs --out RUN (the run directory to continue).")
        config = RunDir(overrides["out"]).config_file
        if not config.is_file():
            raise nothing_to_resume(RunDir(overrides["out"]))
    run = RunDir(train(load_config(config, overrides), resume=resume, overwrite=overwrite, allow_changes=allow_changes))
    typer.echo(f"Run finished: {run.path} (model in {run.model_dir}; evaluate with `sslens evaluate {run.path}`)")


def _preset_config(preset: str, method: str, config: Path | None) -> Path:
    """The packaged config ``<method>-<preset>``; a clear error if there is none."""
    from sslens.train.config import packaged_configs, resolve_config_path

    if config is not None:
        raise UserError("--preset and --config both choose the config; pass only one.")
    name = f"{method}-{preset}"
    if name not in packaged_configs():
        presets = sorted({c.split("-", 1)[1] for c in packaged_configs() if c.startswith(f"{method}-")})
        raise UserError(
            f"There is no preset {preset!r} for {method}. Presets for {method}: {', '.join(presets)}."
        )
    return resolve_config_path(name)


@app.command("evaluate", short_help="kNN and linear-probe top-1 of a model's features.")
def evaluate_command(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (or model directory) written by `sslens train`.")],
    k: Annotated[int, typer.Option(help="Neighbours of the weighted kNN classifier.")] = 200,
    temperature: Annotated[float, typer.Option(help="Temperature of the kNN vote weights exp(s/T).")] = 0.1,
    linear: Annotated[bool, typer.Option("--linear/--no-linear", help="Also train a linear probe.")] = True,
    device: Annotated[str, typer.Option(help="auto (CUDA if available), cpu, cuda or cuda:N.")] = "auto",
    data: Annotated[str | None, typer.Option(
        help="Evaluate on this dataset (synthetic, cifar10, imagefolder) instead of the run's own; "
        "needed for imported models, which record no training data.",
    )] = None,
    data_dir: Annotated[str | None, typer.Option(help="Folder of --data (cifar10, imagefolder).")] = None,
    image_size: Annotated[int | None, typer.Option(
        help="Side the --data images are prepared at (e.g. 224 for ImageNet models); the model's own "
        "input size and normalisation are applied on top (see docs/MODELS.md).",
    )] = None,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Also write the results here (RUN_DIR/evaluation.json is always written).",
    )] = None,
) -> None:
    """Evaluate a model's frozen features: kNN and linear-probe top-1 on the held-out split.

    The training split is the kNN memory bank and the probe's training set; the test split is
    held out for the scores. By default these are the run's own dataset; --data picks another
    (and is how imported models are evaluated).
    """
    from sslens.evaluate.run import evaluate_run

    evaluation = evaluate_run(
        run_dir, k=k, temperature=temperature, linear=linear, device=device, data=data, data_dir=data_dir,
        image_size=image_size, json_path=json_path,
    )
    typer.echo(evaluation.text)
    for path in evaluation.written:
        typer.echo(f"wrote {path}")
    if evaluation.failed:
        raise UserError("; ".join(f"Could not write {path} ({why})" for path, why in evaluation.failed)
                        + ". The results above are complete; free space or choose a writable --json.")


@app.command("explain", short_help="Explain what a model's representation looks at.")
def explain_command(
    model: Annotated[str | None, typer.Argument(
        help="Run directory, model directory or checkpoint written by sslens (omit with --weights).",
    )] = None,
    image: Annotated[list[str], typer.Option(
        "--image", "-i", help="Image file or folder of images (repeatable).",
    )] = ...,
    method: Annotated[str, typer.Option(
        help="relax, perceptual, gradcam, or another CAM: gradcam++, xgradcam, layercam, eigencam, scorecam, hirescam; "
        "label-free attribution: labelfree-ig, labelfree-gxi; COCOA (with --corpus and --foil): cocoa-ig, "
        "cocoa-masking; for a ViT: rollout, cls-attention, gradient-attention; image pairs: correspondence.",
    )] = "relax",
    out: Annotated[Path, typer.Option(help="Folder for the .npz maps and .png figures.")] = Path("explanations"),
    reference: Annotated[str | None, typer.Option(
        help="Reference of the CAMs and gradient-attention: an image, a folder (its mean embedding) or 'augmented' "
        "(a seeded view of the image itself); of correspondence: an image or 'augmented'.",
    )] = None,
    corpus: Annotated[list[str] | None, typer.Option(
        "--corpus", metavar="FOLDER_OR_IMAGE",
        help="COCOA's corpus (cocoa-ig, cocoa-masking): images the explained image is compared with, e.g. of "
        "its class (repeatable; a folder gives all its images).",
    )] = None,
    foil: Annotated[list[str] | None, typer.Option(
        "--foil", metavar="FOLDER_OR_IMAGE",
        help="COCOA's foil: images the corpus is contrasted with, e.g. random images (repeatable; a folder "
        "gives all its images).",
    )] = None,
    layer: Annotated[str | None, typer.Option(
        help="Layer of Grad-CAM and correspondence (default: the last convolutional stage, or a ViT's last block).",
    )] = None,
    components: Annotated[str | None, typer.Option(
        help="Perceptual components, comma-separated: color,shape,texture,brightness,sharpness,depth,lowpass,highpass.",
    )] = None,
    weights: Annotated[str | None, typer.Option(help="A local torchvision ResNet state dict to explain instead of an sslens model.")] = None,
    arch: Annotated[str | None, typer.Option(help="Architecture of --weights or of a --format checkpoint, e.g. resnet50.")] = None,
    format: Annotated[str | None, typer.Option(
        help="MODEL is a published checkpoint in this layout (moco, swav, simclr, barlowtwins, vicreg, dino, byol, "
        "torchvision, timm); "
        "it is imported once into ~/.cache/sslens/imported (see `sslens import`).",
    )] = None,
    timm_name: Annotated[str | None, typer.Option(help="timm model name, with --format timm.")] = None,
    output: Annotated[str, typer.Option(help="Embedding to explain: pooled, projection (or prototypes for imported SwAV).")] = "pooled",
    num_masks: Annotated[int | None, typer.Option(help="Masks for relax, perceptual and cocoa-masking (default 3000).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the masks and augmentations.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA if available), cpu, cuda or cuda:N.")] = "auto",
    depth_model: Annotated[str | None, typer.Option(
        help="MiDaS model for the perceptual depth component (MiDaS_small, MiDaS, DPT_Hybrid, DPT_Large), "
        "loaded through torch.hub (online or from its cache); without it depth is skipped.",
    )] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace output files that already exist (otherwise the run stops before explaining anything).",
    )] = False,
    strict: Annotated[bool, typer.Option(
        help="Stop at the first unreadable image, reference, corpus or foil file, instead of skipping it with a warning.",
    )] = False,
    progress: Annotated[bool | None, typer.Option(
        "--progress/--no-progress", help="Rich progress bar (default: only on a terminal).", show_default=False,
    )] = None,
) -> None:
    """Explain what a model's representation looks at; writes raw maps (.npz) and overlays (.png).

    Output names add the options that change the map (e.g. cat_gradcam_layer3_ref-dog.npz).
    Unreadable files are skipped with a warning; the command fails only if none could be explained.
    """
    from sslens.explain.run import explain_images

    explain_images(
        model, image, method=method, out_dir=out, reference=reference, corpus=corpus, foil=foil, layer=layer,
        components=[c.strip() for c in components.split(",") if c.strip()] if components else None,
        weights=weights, format=format, arch=arch, timm_name=timm_name, output=output, num_masks=num_masks,
        seed=seed, device=device, depth_model=depth_model, overwrite=overwrite, strict=strict,
        progress="auto" if progress is None else progress,
    )


@app.command("import", short_help="Import a published checkpoint as an sslens model.")
def import_command(
    checkpoint: Annotated[str, typer.Argument(help="The published checkpoint file (or a name with --download).")],
    format: Annotated[str, typer.Option(
        help="Source layout: moco, swav, simclr, barlowtwins, vicreg, dino, byol, torchvision or timm.",
    )],
    out: Annotated[Path, typer.Option(help="The sslens model directory to write.")],
    arch: Annotated[str | None, typer.Option(
        help="ResNet of the checkpoint (resnet18, resnet50, resnet50-cifar, ...); default: read from its keys.",
    )] = None,
    timm_name: Annotated[str | None, typer.Option(help="timm model name, for --format timm.")] = None,
    download: Annotated[bool, typer.Option(help="Fetch the checkpoint from the authors' URL (needs internet).")] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="Where --download stores files.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing model directory at --out.")] = False,
) -> None:
    """Import a published self-supervised checkpoint into an sslens model directory (safetensors)."""
    from sslens.published import import_checkpoint, import_summary

    out_dir = import_checkpoint(
        checkpoint, format, out, arch=arch, timm_name=timm_name, download=download,
        cache_dir=cache_dir, overwrite=overwrite,
    )
    typer.echo(import_summary(out_dir))


def _run_study_command(config, out: Path, progress: bool | None) -> None:
    from sslens.distributed import world
    from sslens.study import format_tradeoff, run_study

    outcome = run_study(config, out, progress="auto" if progress is None else progress)
    # Under torchrun every rank returns the same outcome; rank 0 tells it.
    if world().is_main:
        typer.echo(format_tradeoff(outcome.tradeoff, outcome.tradeoff_columns))
        typer.echo(f"Report: {outcome.report} (numbers in {outcome.results}; {outcome.seconds:.0f} s)")


@app.command("study", short_help="Train, explain and compare models in one report.")
def study_command(
    config: Annotated[Path, typer.Option(
        "--config", "-c", help="Study YAML file, or a packaged one (study-demo, study-cifar10).",
    )],
    out: Annotated[Path, typer.Option(help="Output folder: models/, cache/, figures/, results.json, report.html.")],
    data_dir: Annotated[str | None, typer.Option(help="Dataset folder (sets dataset.data_dir).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N (overrides the file).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of samples, masks, t-SNE and probes (overrides the file).")] = None,
    progress: Annotated[bool | None, typer.Option(
        "--progress/--no-progress", help="Rich progress bar (default: only on a terminal).", show_default=False,
    )] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="Set any study key (repeatable; dotted keys reach into sections).",
    )] = None,
) -> None:
    """Train (or load) several models, run every experiment and write one report of the trade-off.

    Finished models and finished stages in --out are reused; the report is replaced only when
    the whole study has succeeded.
    """
    from sslens.study.config import load_study_config, parse_overrides

    flags = {"dataset.data_dir": data_dir, "device": device, "seed": seed}
    overrides = {key: value for key, value in flags.items() if value is not None}
    overrides.update(parse_overrides(set_ or []))
    _run_study_command(load_study_config(config, overrides), out, progress)


@app.command("groundtruth", short_help="Check the explainers against answers known in advance.")
def groundtruth_command(
    out: Annotated[Path, typer.Option(help="Output folder: groundtruth/ (its models), cache/, results.json, report.html.")],
    config: Annotated[Path, typer.Option(
        "--config", "-c", help="Study YAML whose explainer options are checked (default: the demo's).",
    )] = Path("study-demo"),
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N (overrides the file).")] = None,
    progress: Annotated[bool | None, typer.Option(
        "--progress/--no-progress", help="Rich progress bar (default: only on a terminal).", show_default=False,
    )] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="Set any study key, e.g. settings.groundtruth.epochs=40 (repeatable).",
    )] = None,
) -> None:
    """Train small models whose answer is known (a planted marker, colour and blur policies, a
    grayscale-only encoder) and report whether each explainer finds it: passes, fails or inconclusive.
    Every listed explainer takes the planted-cue and the map policy tests; the component policy
    tests are the perceptual explainer's.

    The same as the study experiment `groundtruth` run alone; the study's own models are not trained.
    """
    from sslens.distributed import world
    from sslens.study import run_study
    from sslens.study.config import load_study_config, parse_overrides

    overrides = {"experiments": ["groundtruth"], **({"device": device} if device else {})}
    overrides.update(parse_overrides(set_ or []))
    outcome = run_study(load_study_config(config, overrides), out, progress="auto" if progress is None else progress)
    if world().is_main:
        rows = json.loads(outcome.results.read_text())["experiments"]["groundtruth"]["study"]["tests"]
        for row in rows:
            what = row.get("explainer") or row.get("component")
            typer.echo(f"{row['method']:<13} {row['test']:<18} {what:<18} {row['verdict']}")
        typer.echo(f"Report: {outcome.report} (numbers in {outcome.results}; {outcome.seconds:.0f} s)")


@app.command("demo", short_help="The packaged CPU demo study (under 5 minutes).")
def demo_command(
    out: Annotated[Path, typer.Option(help="Output folder of the demo study.")] = Path("sslens-demo"),
    progress: Annotated[bool | None, typer.Option(
        "--progress/--no-progress", help="Rich progress bar (default: only on a terminal).", show_default=False,
    )] = None,
) -> None:
    """The packaged CPU demo: SimCLR, MoCo v2 and SwAV on the synthetic shapes world, under 5 minutes.

    The same as `sslens study --config study-demo`; ends with the trade-off table and the report path.
    """
    from sslens.study.config import load_study_config

    _run_study_command(load_study_config("study-demo"), out, progress)


#: Operating-system errors a user fixes (space, permissions, a wrong path), printed as one line.
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``sslens`` script and ``python -m sslens``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", SslensWarning)
            original = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None) -> None:
                # What sslens works around is said in one line, like an error, not as a Python warning.
                if issubclass(category, SslensWarning):
                    print(f"sslens: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
                else:
                    original(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            app(args=argv, prog_name="sslens")
    except UserError as error:
        _fail(str(error))
    except RuntimeError as error:
        from sslens.distributed import explain_timeout

        message = explain_timeout(error)
        if message is None:
            raise
        _fail(message)
    except OSError as error:
        if error.errno not in USER_OS_ERRORS:
            raise
        where = f" {error.filename}" if error.filename else ""
        _fail(
            f"Cannot write or read{where}: {error.strerror}. Free disk space, or choose a folder you "
            f"can write (--out); what earlier commands wrote is unchanged."
        )
    finally:
        _leave_process_group()


def _fail(message: str) -> None:
    print(f"sslens: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(USER_ERROR_EXIT) from None


def _leave_process_group() -> None:
    """Under torchrun, leave the process group the command joined (NCCL warns at exit otherwise)."""
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
