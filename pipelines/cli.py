"""The `ferpipe` command with the pipeline verbs (run, compile, submit, schedule) added.

It lives here, not in ferpipe/, because these verbs need kfp and the DAG, and
the library never imports them.
"""

from __future__ import annotations

import sys

from ferpipe import cli


def _run(args) -> None:
    from pipelines.local_run import run_locally

    run = run_locally(args.data, args.dataset, args.out, network=args.network, profile=args.profile, seed=args.seed,
                      mlflow_uri=args.mlflow_uri, max_folds=args.max_folds, n_folds=args.folds)
    print(f"\npipeline finished in {run.seconds / 60:.1f} min")
    for task, (hit, total) in run.cache_summary().items():
        if hit:
            print(f"cache:       {task}: {hit} of {total} reused")
    print(f"results:     {run.results}/  (report.md, table.md, results.json, confusion/ensemble.png, gradcam/)")
    print(f"artifacts:   {run.out / 'artifacts'}/  (every task's outputs)")
    print(f"MLflow run:  {run.mlflow_run_id or '(MLflow off)'} in {run.mlflow_uri}")
    if run.mlflow_uri.startswith("sqlite:"):
        print(f"MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {run.mlflow_uri}  then open http://127.0.0.1:5000")


def _compile(args) -> None:
    from pipelines.remote import compile_pipeline

    print(f"compiled: {compile_pipeline(args.out)} (upload it in the Kubeflow UI: Pipelines > Upload pipeline)")


def _arguments(args) -> dict:
    values = {"data_uri": args.data, "dataset": args.dataset, "network": args.network, "profile": args.profile,
              "seed": args.seed, "max_folds": args.max_folds}
    if args.mlflow_uri is not None:
        values["mlflow_uri"] = args.mlflow_uri
    return values


def _submit(args) -> None:
    from pipelines.remote import submit

    print(f"run started: {submit(args.host, _arguments(args), run_name=args.run_name)}")


def _schedule(args) -> None:
    from pipelines.remote import schedule

    print(f"recurring run created: {schedule(args.host, args.cron, _arguments(args), name=args.name)}")


def _run_options(parser, local: bool) -> None:
    parser.add_argument("--dataset", required=True, choices=("ckplus", "jaffe", "sfew", "folder"))
    parser.add_argument("--data", required=True, help="the raw dataset: a folder" + ("" if local else " or s3:// URI"))
    parser.add_argument("--network", default="el", choices=("el", "ftl", "baseline"))
    parser.add_argument("--profile", default="demo" if local else "paper", choices=("smoke", "demo", "paper"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-folds", type=int, default=0, help="train only the first N folds (0 = all)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI (default: " + ("OUT/mlflow.db" if local else "the pipeline's") + ")")


def build_parser():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")

    run = commands.add_parser("run", help="run the whole pipeline locally (KFP local runner)")
    _run_options(run, local=True)
    run.add_argument("--folds", type=int, default=10, help="k for k-fold datasets")
    run.add_argument("--out", default="runs/latest", help="where artifacts, results and mlflow.db go")
    run.set_defaults(handler=_run)

    comp = commands.add_parser("compile", help="write the pipeline's IR YAML for the Kubeflow UI")
    comp.add_argument("--out", default="pipelines/ferpipe.yaml")
    comp.set_defaults(handler=_compile)

    sub = commands.add_parser("submit", help="start a run on a Kubeflow Pipelines endpoint")
    sub.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    sub.add_argument("--run-name", default=None)
    _run_options(sub, local=False)
    sub.set_defaults(handler=_submit)

    sch = commands.add_parser("schedule", help="create a recurring run (reruns when new data arrives)")
    sch.add_argument("--host", required=True)
    sch.add_argument("--cron", required=True, help="cron expression, e.g. '0 3 * * *' (daily at 03:00)")
    sch.add_argument("--name", default="ferpipe-rerun")
    _run_options(sch, local=False)
    sch.set_defaults(handler=_schedule)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
