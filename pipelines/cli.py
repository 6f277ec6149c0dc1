"""The `ferpipe` command: one tree for every verb, the library's and the pipeline's.

It lives in pipelines/, the top of the import arrow (pipelines -> components ->
ferpipe), because `run`, `compile`, `submit` and `schedule` need kfp and the
DAG, which the library never imports. Every choice and default comes from the
settings dataclasses and constants that the stages and the DAG use themselves,
so a flag and the DAG parameter it feeds cannot disagree. One flag, one
meaning: `--folds K` is always the number of folds; `--max-folds N` trains the
first N; `--only-folds I ...` names folds to train.

User mistakes and failures of the environment (a full disk, an S3 server that
refuses or never answers) end in one line on stderr and exit status 2, and so
do flags argparse refuses; counts are checked here, at the door, before any
work. `--verbose` shows library logs and the traceback of anything; a real bug
shows its traceback always.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from ferpipe import console
from ferpipe.data.adapters.folder import DEFAULT_SUBJECT_PATTERN
from ferpipe.data.datasets import DATASETS, DatasetOptions
from ferpipe.data.shards import DEFAULT_SHARD_SIZE
from ferpipe.errors import UserError
from ferpipe.model.profiles import EXPRESSIONS, NETWORK_TYPES, OPTIMISTIC, PROFILES, SELECTIONS, TEST_FOLD, VALIDATION
from ferpipe.preprocess.detection import FALLBACKS, DetectionSettings
from ferpipe.preprocess.imaging import ClaheSettings
from ferpipe.preprocess.landmarks import LANDMARK_SOURCES, LandmarkSettings
from pipelines.containers import RUNNERS

log = logging.getLogger("ferpipe.cli")
MLFLOW_USER_PASSWORD = "FERPIPE_MLFLOW_USER_PASSWORD"  # `ferpipe mlflow-user` reads the new password here

CLAHE, DETECTION, LANDMARKS, DATASET_OPTIONS = ClaheSettings(), DetectionSettings(), LandmarkSettings(), DatasetOptions()
# OSErrors that the machine causes, not the code: told in one line like a UserError.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                      errno.EISDIR, errno.ENAMETOOLONG, errno.EMFILE, errno.EIO}
# MLflow's HTTP client otherwise waits 120 s per call and retries 7 times with doubling backoff.
MLFLOW_BOUNDS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 # a model's download draws MLflow's own progress bars: noise around ferpipe's lines
                 "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


class Parser(argparse.ArgumentParser):
    """argparse that refuses a flag in one line (usage is one `--help` away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def at_least(minimum: int):
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    count.__name__ = f"count >= {minimum}"
    return count


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = positive_number(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


# --- option groups shared by several verbs ---------------------------------------------------------------------

def _data_options(parser, remote: bool) -> None:
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="layout and protocol of the raw data")
    parser.add_argument("--data", required=True,
                        help="the raw dataset: " + ("s3://bucket/prefix" if remote else "a folder or s3://bucket/prefix"))


def _preprocess_options(parser) -> None:
    group = parser.add_argument_group("preprocessing (stages 1-4)")
    group.add_argument("--folds", type=at_least(2), default=DATASET_OPTIONS.n_folds,
                       help="number of folds for k-fold datasets (CK+, folder); JAFFE is leave-one-subject-out, "
                            "SFEW train/val, split and fer2013 their own train/validation/test (default: %(default)s)")
    group.add_argument("--clahe-clip", type=positive_number, default=CLAHE.clip_limit,
                       help="CLAHE clip limit (%(default)s)")
    group.add_argument("--clahe-tiles", type=at_least(1), default=CLAHE.tile_grid,
                       help="CLAHE tiles per side (%(default)s)")
    group.add_argument("--confidence", type=fraction, default=DETECTION.confidence,
                       help="SSD confidence a face must reach (%(default)s)")
    group.add_argument("--on-no-face", default=DETECTION.on_no_face, choices=FALLBACKS,
                       help="skip: record no_face; dlib_hog: try dlib's HOG detector (%(default)s)")
    group.add_argument("--landmarks", default=LANDMARKS.source, choices=LANDMARK_SOURCES,
                       help="dlib, or dataset: CK+'s own landmark files (%(default)s)")
    group.add_argument("--shard-size", type=at_least(1), default=DEFAULT_SHARD_SIZE, metavar="N",
                       help="images per shard, about: stages 1-4 run shard by shard, one pack of pixels each "
                            "(%(default)s)")
    group.add_argument("--subjects-meta", default=None, metavar="FILE",
                       help="CSV of per-subject attributes (a 'subject' or first column, then e.g. age, gender) for "
                            "accuracy per group; default: a folder dataset's own subjects.csv, if it has one")


def _training_options(parser, profile: str) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--network", default="el", choices=NETWORK_TYPES,
                       help="el: one network per part (the paper's); ftl: five pre-trained on all 68 points; "
                            "baseline: five randomly initialised (%(default)s)")
    group.add_argument("--profile", default=profile, choices=tuple(PROFILES),
                       help="smoke (seconds), demo (minutes on a CPU), paper (the paper's epochs; GPUs) (%(default)s)")
    group.add_argument("--seed", type=int, default=0, help="the same seed repeats a run (%(default)s)")
    group.add_argument("--expression", default=None, choices=EXPRESSIONS,
                       help="the expression phase after landmark pre-training: fine-tune (the head, then everything; "
                            "the paper's text) or head-only (the head on the frozen extractor; the authors' notebook) "
                            "(default: the profile's)")
    group.add_argument("--selection", default=VALIDATION, choices=SELECTIONS,
                       help="how each member's checkpoint is chosen: validation (strict: subjects drawn from the "
                            "training side) or test-fold (also reports, from the same trainings, what the lowest loss "
                            "on the test fold picks, as the authors' notebook did: labelled optimistic, and the "
                            "run trains and registers no final model) (%(default)s)")


def _pipeline_options(parser, local: bool) -> None:
    _data_options(parser, remote=not local)
    _preprocess_options(parser)
    _training_options(parser, "demo" if local else "paper")
    group = parser.add_argument_group("pipeline")
    group.add_argument("--max-folds", type=at_least(0), default=0, help="train only the first N folds (0 = all)")
    group.add_argument("--no-final-model", dest="final_model", action="store_false",
                       help="stop after cross-validation: no ensemble trained on all subjects, nothing registered")
    group.add_argument("--mlflow-uri", default=None,
                       help="MLflow tracking URI (default: " + ("OUT/mlflow.db" if local else "the pipeline's") + ")")


def _gpu_option(parser) -> None:
    parser.add_argument("--max-parallel-gpu", type=int, default=0, metavar="N",
                        help="at most N GPU training tasks at once (0 = no limit): N >= 5 trains N // 5 folds at a "
                             "time, N < 5 one fold at a time with N of its trainings at once")


def _checked_gpu_limit(args) -> int:
    if args.max_parallel_gpu < 0:
        raise UserError("--max-parallel-gpu is 0 (no limit) or the number of GPU trainings allowed at once")
    return args.max_parallel_gpu


def pipeline_arguments(args) -> dict:
    """The DAG's parameters from the flags of run, submit and schedule: the one mapping between the two."""
    values = {
        "data_uri": args.data, "dataset": args.dataset, "network": args.network, "profile": args.profile,
        "seed": args.seed, "n_folds": args.folds, "max_folds": args.max_folds,
        "clahe_clip_limit": args.clahe_clip, "clahe_tile_grid": args.clahe_tiles,
        "detection_confidence": args.confidence, "on_no_face": args.on_no_face, "landmark_source": args.landmarks,
        "subject_meta_uri": args.subjects_meta or "", "shard_size": args.shard_size,
        "final_model": args.final_model, "selection": args.selection, "expression": args.expression or "",
    }
    if args.mlflow_uri is not None:
        values["mlflow_uri"] = args.mlflow_uri
    return values


# --- the library's verbs ---------------------------------------------------------------------------------------

def _preprocess(args) -> None:
    from ferpipe.data.storage import open_store
    from ferpipe.preprocess.chain import PreprocessSettings
    from ferpipe.preprocess.preview import write_landmark_sheet
    from ferpipe.preprocess.runner import preprocess, summary, timed

    settings = PreprocessSettings(
        clahe=ClaheSettings(args.clahe_clip, args.clahe_tiles),
        detection=DetectionSettings(confidence=args.confidence, on_no_face=args.on_no_face),
        landmarks=LandmarkSettings(source=args.landmarks),
    )
    options = DatasetOptions(args.subject_pattern, args.subjects_csv, args.folds, args.subjects_meta,
                             args.allow_outside_links)
    manifest, seconds = timed(preprocess, args.dataset, args.data, args.out, settings, options, args.workers,
                              args.cache, args.shard_size)
    log.info(summary(manifest, seconds))
    if (manifest["status"] == "ok").any():
        sheet = write_landmark_sheet(manifest, open_store(args.out))
        log.info(f"landmarks on faces: {args.out.rstrip('/')}/{sheet}")
    log.info(f"manifest: {args.out.rstrip('/')}/manifest.parquet")


def _train_eval(args) -> None:
    from ferpipe.crossval.train_eval import cross_dataset_eval, train_eval
    from ferpipe.model.profiles import get_profile

    if args.test_manifest and args.only_folds is not None:
        raise UserError("--only-folds and --test-manifest exclude each other: a cross-dataset run trains on all "
                        "of --manifest")
    if args.test_manifest and args.selection == TEST_FOLD:
        raise UserError("--selection test-fold needs folds: a cross-dataset run (--test-manifest) has no test fold "
                        "to choose checkpoints by")
    try:
        if args.test_manifest:
            results = cross_dataset_eval(args.manifest, args.test_manifest, args.network,
                                         get_profile(args.profile, args.dataset, args.expression), args.out,
                                         seed=args.seed, dataset=args.dataset)
            accuracy = results["accuracy"]["ensemble"]
        else:
            results = train_eval(args.manifest, args.network, args.profile, args.out, seed=args.seed,
                                 folds=args.only_folds, dataset=args.dataset, selection=args.selection,
                                 expression=args.expression)
            accuracy = results["overall"]["accuracy"]["ensemble"]
    except FileNotFoundError as err:
        raise UserError(f"no manifest at {err.filename or err}") from None
    log.info(f"results: {args.out.rstrip('/')}/results.json (ensemble accuracy {100 * accuracy:.2f}%)")
    if not args.test_manifest:
        log.info(f"report:  {args.out.rstrip('/')}/report.html (open it in a browser)")


def _complexity(args) -> None:
    from ferpipe.model.complexity import complexity_report

    log.info(complexity_report(args.classes))


def _predict(args) -> None:
    import os

    from ferpipe.serving.batch import predict_files

    if args.mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.mlflow_uri  # where models:/ URIs are looked up
    table = predict_files(args.model, args.input, args.out, args.annotate, args.workers)
    counts = ", ".join(f"{status} {n}" for status, n in table["status"].value_counts().items())
    pictures = f"; pictures in {args.annotate}" if args.annotate else ""
    log.info(f"{len(table)} images ({counts}): {args.out}{pictures}")


def _serve(args) -> None:
    from ferpipe.serving.server import serve

    if args.mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.mlflow_uri
    serve(args.model, args.host, args.port, args.workers, args.timeout)


def _demo_data(args) -> None:
    from ferpipe.demo.synthetic import make_demo_dataset

    out = make_demo_dataset(args.out, subjects=args.subjects, per_expression=args.per_expression, seed=args.seed)
    log.info(f"synthetic demo data (JAFFE layout): {out}")


def _mlflow_user(args) -> None:
    from ferpipe.crossval.tracking import check_tracking_server, ensure_user

    password = os.environ.get(MLFLOW_USER_PASSWORD, "")
    if not password:
        raise UserError(f"set the new user's password in {MLFLOW_USER_PASSWORD} (never a flag: it would land in "
                        "shell history and in the pod spec)")
    check_tracking_server(args.mlflow_uri)  # down, or the admin's credentials refused: one line
    log.info(f"MLflow user {args.username!r} {ensure_user(args.mlflow_uri, args.username, password)} "
             f"at {args.mlflow_uri}")


# --- the pipeline's verbs --------------------------------------------------------------------------------------

def _run(args) -> None:
    from pipelines.local_run import run_locally, show_outcome

    if args.selection == TEST_FOLD and args.final_model:
        log.info(f"selection test-fold: the run reports the strict figures and, beside them, the optimistic ones "
                 f"({OPTIMISTIC}); it trains and registers no final model")
    show_outcome(run_locally(args.out, pipeline_arguments(args), args.runner))


def _compile(args) -> None:
    from pipelines.remote import compile_pipeline

    compiled = compile_pipeline(args.out, _checked_gpu_limit(args))
    log.info(f"compiled: {compiled} (upload it in the Kubeflow UI: Pipelines > Upload pipeline)")


def _submit(args) -> None:
    from pipelines.remote import submit

    run = submit(args.host, pipeline_arguments(args), run_name=args.run_name, max_parallel_gpu=_checked_gpu_limit(args))
    log.info(f"run started: {run}")


def _schedule(args) -> None:
    from pipelines.remote import schedule

    job = schedule(args.host, args.cron, pipeline_arguments(args), name=args.name,
                   max_parallel_gpu=_checked_gpu_limit(args))
    log.info(f"recurring run created: {job}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ferpipe", description="Facial expression recognition: the part-based "
                                     "ensemble of Wadhawan & Gandhi, as a Kubeflow pipeline or on this machine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="library logs too, and tracebacks")
    # The same flag after the verb (`ferpipe run ... -v`); SUPPRESS keeps the top level's value when absent.
    common = Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="library logs too, and tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pre = commands.add_parser("preprocess", parents=[common], help="stages 1-4: input, CLAHE, face detection, landmarks; plus folds")
    _data_options(pre, remote=False)
    pre.add_argument("--out", required=True, help="output dataset directory: a folder or s3://bucket/prefix")
    pre.add_argument("--workers", type=at_least(1), default=None, help="processes (default: all cores)")
    pre.add_argument("--cache", default=None,
                     help="folder or s3:// URI of per-image results: a rerun redoes only new or changed images")
    pre.add_argument("--subject-pattern", default=DEFAULT_SUBJECT_PATTERN,
                     help="folder layout: regex whose first group is the subject id in the file name")
    pre.add_argument("--subjects-csv", default=None, help="folder layout: CSV with columns path,subject")
    pre.add_argument("--allow-outside-links", action="store_true",
                     help="read symlinks that lead out of --data (default: record them as outside_data, unread)")
    _preprocess_options(pre)
    pre.set_defaults(handler=_preprocess)

    train = commands.add_parser("train-eval", parents=[common], help="train and evaluate every fold in this process, outside Kubeflow")
    train.add_argument("--manifest", required=True, help="a preprocessed dataset directory (or its manifest.parquet)")
    train.add_argument("--out", required=True, help="run directory: results.json, tables, confusion matrices")
    train.add_argument("--dataset", default=None, choices=DATASETS, help="picks the paper profile's epochs")
    train.add_argument("--only-folds", type=at_least(0), nargs="+", default=None, metavar="I",
                       help="train and test only these folds (default: all)")
    train.add_argument("--test-manifest", default=None,
                       help="cross-dataset (the paper's Table III): train on all of --manifest, test on this dataset")
    _training_options(train, "demo")
    train.set_defaults(handler=_train_eval)

    complexity = commands.add_parser("complexity", parents=[common], help="parameters, FLOPs and storage, beside the paper's")
    complexity.add_argument("--classes", type=int, default=7, choices=(7, 8))
    complexity.set_defaults(handler=_complexity)

    predict = commands.add_parser("predict", parents=[common], help="the final model on photos: one row per file (CSV or Parquet)")
    predict.add_argument("--model", required=True,
                         help="models:/NAME/VERSION or models:/NAME@champion (its files checked against the hash "
                              "recorded at registration), or a local export (the final model stage's `ensemble` folder)")
    predict.add_argument("--input", required=True, nargs="+", metavar="PATH_OR_S3_PREFIX",
                         help="image files, folders (searched recursively) or s3://bucket/prefix")
    predict.add_argument("--out", required=True, help="FILE.csv or FILE.parquet (a local path or s3://...)")
    predict.add_argument("--annotate", default=None, metavar="DIR",
                         help="also write each image with its face box, landmarks and predicted label into DIR")
    predict.add_argument("--workers", type=at_least(1), default=None, help="processes for stages 1-3 (default: all cores)")
    predict.add_argument("--mlflow-uri", default=None,
                         help="tracking URI for models:/ (default: $MLFLOW_TRACKING_URI), "
                              "e.g. sqlite:///runs/demo/mlflow.db")
    predict.set_defaults(handler=_predict)

    user = commands.add_parser("mlflow-user", parents=[common],
                               help="create an MLflow user on a server with authentication, or set its password")
    user.add_argument("username")
    user.add_argument("--mlflow-uri", required=True, help="the tracking server, e.g. http://mlflow:5000")
    user.epilog = (f"The password comes from ${MLFLOW_USER_PASSWORD}; the caller's own credentials, an admin's, "
                   "from $MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD.")
    user.set_defaults(handler=_mlflow_user)

    serve = commands.add_parser("serve", parents=[common],
                                help="the final model over HTTP (MLflow's scoring server), its files checked first")
    serve.add_argument("--model", required=True, help="as for predict: models:/NAME@champion, ... or a local export")
    serve.add_argument("--mlflow-uri", default=None, help="tracking URI for models:/ (default: $MLFLOW_TRACKING_URI)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s: this machine only)")
    serve.add_argument("--port", type=at_least(1), default=5001)
    serve.add_argument("--workers", type=at_least(1), default=1,
                       help="server processes, each with its own copy of the model (%(default)s; see docs/serving.md)")
    serve.add_argument("--timeout", type=at_least(1), default=60, help="seconds before a request is answered 504")
    serve.set_defaults(handler=_serve)

    demo = commands.add_parser("demo-data", parents=[common], help="make the SYNTHETIC demo dataset (JAFFE layout), offline")
    demo.add_argument("--out", default="data/demo-synthetic")
    demo.add_argument("--subjects", type=at_least(2), default=10)
    demo.add_argument("--per-expression", type=at_least(1), default=3)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo_data)

    run = commands.add_parser("run", parents=[common], help="run the whole pipeline on this machine (KFP's local runner)")
    _pipeline_options(run, local=True)
    run.add_argument("--out", default="runs/latest", help="where artifacts, results, logs and mlflow.db go")
    run.add_argument("--runner", default="subprocess", choices=RUNNERS,
                     help="subprocess: every task a process of this Python; container: every task in its image "
                          "(`make images` first), through Docker or Podman, as on a cluster (%(default)s)")
    run.set_defaults(handler=_run)

    comp = commands.add_parser("compile", parents=[common], help="write the pipeline's IR YAML for the Kubeflow UI")
    comp.add_argument("--out", default="pipelines/ferpipe.yaml")
    _gpu_option(comp)
    comp.set_defaults(handler=_compile)

    sub = commands.add_parser("submit", parents=[common], help="start a run on a Kubeflow Pipelines endpoint")
    sub.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    sub.add_argument("--run-name", default=None)
    _pipeline_options(sub, local=False)
    _gpu_option(sub)
    sub.set_defaults(handler=_submit)

    sch = commands.add_parser("schedule", parents=[common], help="create a recurring run (reruns when new data arrives)")
    sch.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    sch.add_argument("--cron", required=True, help="cron expression, e.g. '0 3 * * *' (daily at 03:00)")
    sch.add_argument("--name", default="ferpipe-rerun")
    _pipeline_options(sch, local=False)
    _gpu_option(sch)
    sch.set_defaults(handler=_schedule)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.for_console(args.verbose)
    for name, value in MLFLOW_BOUNDS.items():
        os.environ.setdefault(name, value)
    try:
        args.handler(args)
    except UserError as err:
        if args.verbose:
            raise
        print(f"ferpipe: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if args.verbose or err.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"ferpipe: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ferpipe: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
