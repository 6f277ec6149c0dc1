"""The `ferpipe` command. User mistakes end in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys

from ferpipe.errors import UserError


def _preprocess(args) -> None:
    from ferpipe.data.storage import open_store
    from ferpipe.preprocess.chain import PreprocessSettings
    from ferpipe.preprocess.detection import DetectionSettings
    from ferpipe.preprocess.imaging import ClaheSettings
    from ferpipe.preprocess.landmarks import LandmarkSettings
    from ferpipe.preprocess.preview import write_landmark_sheet
    from ferpipe.preprocess.runner import DatasetOptions, preprocess, summary, timed

    settings = PreprocessSettings(
        clahe=ClaheSettings(args.clahe_clip, args.clahe_tiles),
        detection=DetectionSettings(confidence=args.confidence, on_no_face=args.on_no_face),
        landmarks=LandmarkSettings(source=args.landmarks),
    )
    options = DatasetOptions(args.subject_pattern, args.subjects_csv, args.folds)
    manifest, seconds = timed(preprocess, args.dataset, args.data, args.out, settings, options, args.workers,
                              args.cache)
    print(summary(manifest, seconds))
    if (manifest["status"] == "ok").any():
        sheet = write_landmark_sheet(manifest, open_store(args.out))
        print(f"landmarks on faces: {args.out.rstrip('/')}/{sheet}")
    print(f"manifest: {args.out.rstrip('/')}/manifest.parquet")


def _train_eval(args) -> None:
    from ferpipe.crossval.train_eval import cross_dataset_eval, train_eval

    if args.test_manifest and args.folds is not None:
        raise UserError("--folds and --test-manifest exclude each other: a cross-dataset run trains on all of --manifest")
    try:
        if args.test_manifest:
            results = cross_dataset_eval(args.manifest, args.test_manifest, args.network, args.profile, args.out,
                                         seed=args.seed, dataset=args.dataset)
            accuracy = results["accuracy"]["ensemble"]
        else:
            results = train_eval(args.manifest, args.network, args.profile, args.out, seed=args.seed,
                                 folds=args.folds, dataset=args.dataset)
            accuracy = results["overall"]["accuracy"]["ensemble"]
    except FileNotFoundError as err:
        raise UserError(f"no manifest at {err.filename or err}") from None
    print(f"results: {args.out.rstrip('/')}/results.json (ensemble accuracy {100 * accuracy:.2f}%)")


def _complexity(args) -> None:
    from ferpipe.model.complexity import complexity_report

    print(complexity_report(args.classes))


def _demo_data(args) -> None:
    from ferpipe.demo.synthetic import make_demo_dataset

    out = make_demo_dataset(args.out, subjects=args.subjects, per_expression=args.per_expression, seed=args.seed)
    print(f"synthetic demo data (JAFFE layout): {out}")


def build_parser() -> argparse.ArgumentParser:
    from ferpipe.preprocess.runner import DATASETS

    parser = argparse.ArgumentParser(prog="ferpipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    pre = commands.add_parser("preprocess", help="stages 1-4: input, CLAHE, face detection, landmarks; plus folds")
    pre.add_argument("--dataset", required=True, choices=DATASETS)
    pre.add_argument("--data", required=True, help="dataset root: a folder or s3://bucket/prefix")
    pre.add_argument("--out", required=True, help="output dataset directory: a folder or s3://bucket/prefix")
    pre.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    pre.add_argument("--folds", type=int, default=10, help="k for k-fold datasets (CK+, folder)")
    pre.add_argument("--subject-pattern", default=r"^([^_]+)_",
                     help="folder layout: regex whose first group is the subject id in the file name")
    pre.add_argument("--subjects-csv", default=None, help="folder layout: CSV with columns path,subject")
    pre.add_argument("--confidence", type=float, default=0.5, help="SSD confidence threshold")
    pre.add_argument("--on-no-face", default="skip", choices=("skip", "dlib_hog"),
                     help="skip: record no_face; dlib_hog: try dlib's HOG detector")
    pre.add_argument("--landmarks", default="dlib", choices=("dlib", "dataset"),
                     help="dataset: use CK+'s own landmark files")
    pre.add_argument("--cache", default=None,
                     help="folder or s3:// URI of per-image results: a rerun redoes only new or changed images")
    pre.add_argument("--clahe-clip", type=float, default=2.0)
    pre.add_argument("--clahe-tiles", type=int, default=8)
    pre.set_defaults(handler=_preprocess)

    train = commands.add_parser("train-eval", help="train and evaluate every fold outside Kubeflow")
    train.add_argument("--manifest", required=True, help="a preprocessed dataset directory (or its manifest.parquet)")
    train.add_argument("--network", default="el", choices=("baseline", "ftl", "el"))
    train.add_argument("--profile", default="demo", choices=("smoke", "demo", "paper"))
    train.add_argument("--dataset", default=None, help="ckplus, jaffe or sfew: picks the paper profile's epochs")
    train.add_argument("--folds", type=int, nargs="*", default=None, help="only these folds (default: all)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--test-manifest", default=None,
                       help="cross-dataset (the paper's Table III): train on all of --manifest, test on this dataset")
    train.add_argument("--out", required=True, help="run directory: results.json, tables, confusion matrices")
    train.set_defaults(handler=_train_eval)

    complexity = commands.add_parser("complexity", help="parameters, FLOPs and storage, beside the paper's")
    complexity.add_argument("--classes", type=int, default=7, choices=(7, 8))
    complexity.set_defaults(handler=_complexity)

    demo = commands.add_parser("demo-data", help="make the SYNTHETIC demo dataset (JAFFE layout), offline")
    demo.add_argument("--out", default="data/demo-synthetic")
    demo.add_argument("--subjects", type=int, default=10)
    demo.add_argument("--per-expression", type=int, default=3)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo_data)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except UserError as err:
        print(f"ferpipe: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ferpipe: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
