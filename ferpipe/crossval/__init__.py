"""Cross-validation end to end, the one path `ferpipe train-eval` and the DAG's tasks share.

`fold_dataset` writes one fold's data (stage 5 as the pipeline runs it),
`steps` are the DAG's per-fold steps (train one member, predict a fold,
aggregate), `member_cache` skips members trained before, `train_eval` runs
every fold in one process, `tracking` writes MLflow and `report` publishes the
results. Imports every library package except `demo` and `cli`.
"""
