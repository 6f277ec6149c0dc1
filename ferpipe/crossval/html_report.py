"""One self-contained HTML page per run: what a person reads to decide whether a model is good enough.

The KFP run page shows an `HTML` artifact inline, MLflow keeps it beside the
run, and locally it is OUT/results/report.html. One page serves all three,
so it depends on nothing outside itself: every picture is a data URI, the
style sheet is inline, there is no script and no font or CDN to fetch (the
KFP UI shows HTML in a sandboxed frame, and a cluster is often offline). It
reads on a phone: the layout is one column, wide tables scroll inside their
own box instead of widening the page, pictures shrink to the screen.

Sections, in the order a reviewer asks the questions (`SECTIONS`): what ran
on which data; how accurate, next to the paper's Table I with the spread
across folds, and beside accuracy macro-F1, balanced accuracy and recall per
class (accuracy alone hides a class the model never predicts); where it errs (confusion matrices) and on which faces (the
misses); where it looks (Grad-CAM); whether it serves every group of people
alike; whether fine-tuning kept the landmark knowledge (the paper's V-B); what
it costs (complexity); what the data lost on the way (data quality); where the
model is. A run under test-fold selection says so at the top, and every
figure the test fold selected carries the `OPTIMISTIC` label beside it.
"""

from __future__ import annotations

import base64
import html
import math
import statistics
from pathlib import Path
from typing import Sequence

from ferpipe.evaluate.groups import BELOW, TOO_FEW
from ferpipe.evaluate.misses import MAX_MISSES
from ferpipe.evaluate.scoring import (
    ENSEMBLE,
    PAPER_EL_ENSEMBLE_ACCURACY,
    TABLE_COLUMNS,
    TABLE_ROWS,
    run_metrics_table,
)
from ferpipe.model.profiles import OPTIMISTIC

REPORT_FILE = "report.html"
MISSES_FILE = "misses.png"
SECTIONS = {
    "run": "Run and data",
    "results": "Accuracy and the paper's Table I",
    "confusion": "Confusion matrices",
    "misses": "The images it got wrong",
    "gradcam": "Grad-CAM: where each part network looks",
    "groups": "Accuracy per group of people",
    "landmarks": "Landmark study (paper section V-B, figure 10)",
    "complexity": "Complexity",
    "data-quality": "Data quality",
    "model": "Where the model is",
}
MAX_FOLD_PICTURES = 3  # Grad-CAM and landmark pictures of the first folds; the rest stay in the run's folders

STYLE = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:12px}
header,section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px 16px;margin:12px 0}
h1{font-size:1.35em;margin:.2em 0}h2{font-size:1.15em;margin:.2em 0 .6em}h3{font-size:1em;margin:1em 0 .4em}
nav{display:flex;flex-wrap:wrap;gap:6px 12px;font-size:.9em}nav a{color:#2456a6}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.3em 0 .8em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dde1e7;padding:3px 8px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#eef1f5}
img{max-width:100%;height:auto;display:block;border:1px solid #dde1e7;background:#fff}
.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,260px),1fr));gap:10px}
.figures.wide{grid-template-columns:repeat(auto-fill,minmax(min(100%,520px),1fr))}
table.kv td{white-space:normal;text-align:left;overflow-wrap:anywhere}
figure{margin:0}figcaption{font-size:.85em;color:#555}
.thumbs{display:flex;flex-wrap:wrap;gap:8px}.thumbs figure{width:110px}
.note{color:#555;font-size:.9em}.warn{color:#a4201b;font-weight:600}.few{color:#777;font-style:italic}
pre{overflow-x:auto;background:#f3f4f6;padding:8px;font-size:.85em}
code{word-break:break-all}
"""


def _e(value) -> str:
    return html.escape(str(value))


def _percent(value, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence], caption: str = "", wrap: bool = False) -> str:
    """A table that scrolls in its own box on a narrow screen; `wrap` for key/value text that should wrap instead."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    note = f"<p class=note>{caption}</p>" if caption else ""
    kind = " class=kv" if wrap else ""
    return f"<div class=scroll><table{kind}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{note}"


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _figure(path: Path, caption: str) -> str:
    if not path.is_file():
        return ""
    return (f'<figure><img src="{png_data_uri(path.read_bytes())}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _section(key: str, body: str) -> str:
    return f'<section id="{key}"><h2>{_e(SECTIONS[key])}</h2>{body}</section>'


def _run_section(results: dict, run: dict) -> str:
    rows = [[_e(k), f"<code>{_e(v)}</code>"] for k, v in run.items() if v not in (None, "")]
    rows.append(["classes", _e(", ".join(results["classes"]))])
    rows.append(["folds", _e(", ".join(results["folds"]))])
    rows.append(["test images", _e(results["overall"]["images"])])
    return _table(["", "value"], rows, wrap=True)


def _spread(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if len(values) < 2:
        return "—"
    return f"{100 * statistics.stdev(values):.2f}"


def _marked(text: str) -> str:
    """A row or column name for a figure the test fold selected: the label in full, in the warning colour."""
    return f"{text} <span class=warn>({_e(OPTIMISTIC)})</span>"


def _fold_table(results: dict, folds: dict, spread: dict, columns: list[str], mean: dict | None,
                caption: str) -> str:
    """Accuracy per fold (%); LOSO folds are named by their subject; then mean, SD, lowest, median, highest."""
    def name(k: str) -> str:
        subjects = results["folds"][k].get("test_subjects") or []
        return f"fold {_e(k)}" + (f" (subject {_e(subjects[0])})" if len(subjects) == 1 else "")

    rows = [[name(k), _e(f["images"]), *(_percent(f["accuracy"][c], 1) for c in columns)] for k, f in folds.items()]
    if mean is not None:
        rows.append(["<b>mean of folds</b>", "", *(_percent(mean[c]) for c in columns)])
    rows.append(["<b>spread (SD across folds)</b>", "",
                 *(_spread([f["accuracy"][c] for f in folds.values()]) for c in columns)])
    for which in ("lowest", "median", "highest"):
        cells = []
        for c in columns:
            entry = spread.get(c)
            fold = entry and entry.get(f"{which}_fold")
            where = f" (fold {_e(fold)})" if fold is not None and which != "median" and len(folds) > 2 else ""
            cells.append(_percent(entry[which], 1) + where if entry else "—")
        rows.append([f"<b>{which} fold</b>", "", *cells])
    return _table(["fold", "test images", *columns], rows, caption)


def _results_section(results: dict, dataset: str) -> str:
    network = results["network"]
    overall = results["overall"]
    optimistic = results.get("optimistic")
    columns = [c for c in TABLE_COLUMNS if c in overall["accuracy"]]
    ours = [f"<b>{_e(TABLE_ROWS.get(network, network))}, this run</b>",
            *(_percent(overall["accuracy"][c]) for c in columns)]
    rows = [ours]
    if optimistic:
        rows.append([_marked(f"<b>{_e(TABLE_ROWS.get(network, network))}, this run</b>"),
                     *(_percent(optimistic["overall"]["accuracy"][c]) for c in columns)])
    paper = PAPER_EL_ENSEMBLE_ACCURACY.get(dataset)
    if paper is not None:
        rows.append([f"EL, the paper ({_e(dataset)})", *(["—"] * (len(columns) - 1)), f"{paper:.2f}"])
        note = ("The paper's ensemble accuracy is its Table I; its per-part figures are not transcribed in ferpipe, "
                "so those cells are empty. Our profile (epochs, input size) decides how close a run can come.")
    else:
        note = f"The paper reports no figures for dataset '{_e(dataset)}' (it tests CK+, JAFFE and SFEW)."
    if optimistic:
        note += (f" <span class=warn>The marked row is {_e(optimistic['how'])}: the paper's protocol, not how the "
                 "method does on people it has not seen.</span> The unmarked row is strict: validation subjects "
                 "drawn from the training side chose every checkpoint.")
    text = "<h3>All folds pooled (accuracy %)</h3>" + _table(["network", *columns], rows, note)
    text += "<h3>Beside accuracy (%)</h3>" + _metrics_table(results)
    folds = results["folds"]
    per_subject = all(len(f.get("test_subjects") or ()) == 1 for f in folds.values())
    text += ("<h3>Per fold (accuracy %)" + (": each fold one subject, so this is the spread over people" if
                                             per_subject else "") + "</h3>")
    text += _fold_table(results, folds, overall["spread"]["accuracy"], columns, overall["mean_fold_accuracy"],
                        "Pooled accuracy counts every test image once; the mean of folds weighs each fold alike, "
                        "which differs when folds differ in size.")
    if optimistic:
        text += f"<h3>Per fold, {_marked('accuracy %')}</h3>" + _fold_table(
            results, {k: f["optimistic"] for k, f in folds.items()}, optimistic["overall"]["spread"]["accuracy"],
            columns, None, f"Each member's checkpoint as its loss on the fold's test subjects chose it ({_e(OPTIMISTIC)}).")
    return text


def _metrics_table(results: dict) -> str:
    """Table I's companion (scoring.run_metrics_table) as HTML: the optimistic row's label in the warning colour."""
    table = run_metrics_table(results)
    rows = []
    for name, values in table.iterrows():
        plain = name.removesuffix(f" ({OPTIMISTIC})")
        label = _marked(_e(plain)) if plain != name else _e(name)
        rows.append([label, *("—" if math.isnan(v) else f"{v:.2f}" for v in values)])
    return _table([table.index.name, *table.columns], rows,
                  "Pooled over folds. Macro-F1 averages each class's F1 and balanced accuracy each class's recall, "
                  "so a class the model never predicts costs both a whole class's weight (1/classes) however few "
                  "images it has, where accuracy loses only that class's share of the images. Lowest, median and "
                  "highest fold are fold accuracies.")


def _confusion_section(reports: Path, results: dict) -> str:
    order = [ENSEMBLE, *[c for c in TABLE_COLUMNS if c != ENSEMBLE]]
    figures = "".join(_figure(reports / "confusion" / f"{name}.png", f"{name}: rows true class, columns predicted")
                      for name in order)
    if results.get("optimistic"):
        figures += _figure(reports / "confusion" / f"{ENSEMBLE}-optimistic.png",
                           f"ensemble, {OPTIMISTIC}: rows true class, columns predicted")
    return f"<div class=figures>{figures}</div>" if figures else "<p>No confusion matrices were written.</p>"


def _misses_section(reports: Path, results: dict) -> str:
    matrix = results["overall"]["confusion"].get(ENSEMBLE)
    if matrix is None:
        return "<p>No predictions were pooled.</p>"
    wrong = int(sum(map(sum, matrix)) - sum(matrix[i][i] for i in range(len(matrix))))
    if not wrong:
        return "<p>The ensemble got every test image right.</p>"
    figure = _figure(reports / MISSES_FILE, "true class -> the ensemble's pick; the pick's share of the summed "
                                            "probabilities; the image")
    shown = min(wrong, MAX_MISSES)
    text = (f"<p class=note>{wrong} of {results['overall']['images']} test images, "
            f"{'all' if shown == wrong else f'the {shown} most confident'} shown, the most confident mistakes first. "
            "Look for labels the face does not show before blaming the model.</p>")
    return text + (figure or "<p>The picture was not written (the stage-4 dataset was not at hand).</p>")


def _fold_pictures(reports: Path, folder: str, results: dict, caption: str) -> str:
    folds = list(results["folds"])
    figures = "".join(_figure(reports / folder / f"fold{k}.png", f"fold {k}: {caption}")
                      for k in folds[:MAX_FOLD_PICTURES])
    rest = len(folds) - MAX_FOLD_PICTURES
    more = f"<p class=note>{rest} more folds' pictures are in the run's {folder}/ folder.</p>" if rest > 0 else ""
    return (figures + more) if figures else ""


def _groups_section(groups: dict | None) -> str:
    if not groups or not groups.get("attributes"):
        return ("<p>No subject metadata: give <code>--subjects-meta FILE</code> (a CSV of subject, age, gender, ...) "
                "or put a <code>subjects.csv</code> beside a folder dataset's class folders.</p>")
    overall = groups["overall"]
    text = (f"<p>Ensemble accuracy over all {overall['images']} test images: <b>{_percent(overall['accuracy'])}%</b>. "
            f"Per group with a 95% Wilson interval; groups under {groups['min_images']} test images are "
            f"<i>{TOO_FEW}</i>. <span class=warn>Flagged</span>: the whole interval lies below the overall accuracy."
            "</p>")
    for attribute, entries in groups["attributes"].items():
        rows = []
        for g in entries:
            if g["verdict"] == TOO_FEW:
                numbers = [f"<span class=few>{TOO_FEW}</span>", "", ""]
            else:
                flag = "<span class=warn>flagged: below overall</span>" if g["verdict"] == BELOW else "no"
                numbers = [f"{_percent(g['accuracy'], 1)}", f"{_percent(g['low'], 1)} – {_percent(g['high'], 1)}",
                           flag]
            rows.append([_e(g["group"]), _e(g["images"]), _e(g["subjects"]), *numbers])
        text += f"<h3>{_e(attribute)}</h3>" + _table(
            ["group", "test images", "subjects", "accuracy %", "95% interval %", "flag"], rows)
    for attribute, why in groups.get("skipped", {}).items():
        text += f"<p class=note>{_e(attribute)} not grouped: {_e(why)}.</p>"
    text += ("<p class=note>The interval counts images as independent; several images of one person are not, so the "
             "real uncertainty is wider, more so where a group has few subjects.</p>")
    return text


def _landmarks_section(study: dict | None, reports: Path, results: dict) -> str:
    if not study:
        return ("<p>No landmark study: this network has no landmark pre-training (the baseline), or the run kept "
                "no landmark network.</p>")
    rows = [[_e(slot), _e(m["part"]), _e(m["points"]), _e(m["images"]), _percent(m["before"]), _percent(m["after"]),
             f"{100 * (m['after'] - m['before']):+.2f}", _percent(m["mean_face"])]
            for slot, m in study["members"].items()]
    text = _table(["member", "part", "points", "test images", "error before fine-tuning", "error after",
                   "change", "mean face"], rows,
                  "Mean absolute error of phase 1's landmark head against the stage-4 points, in % of the face crop's "
                  "side, on the test subjects: on the extractor phase 1 left (before) and on the fine-tuned one "
                  "(after). <i>Mean face</i>: always answering the test faces' average shape, what a network that "
                  "knows nothing about the face would score.")
    pictures = _fold_pictures(reports, "landmark_study", results, "dlib points, then each part network's points "
                                                                   "before and after fine-tuning")
    return text + (f"<div class='figures wide'>{pictures}</div>" if pictures else "")


def _complexity_section(complexity: dict | None, text: str) -> str:
    if not complexity:
        return f"<pre>{_e(text)}</pre>" if text else "<p>Not measured.</p>"
    sub, ens, paper = complexity["subnetwork"], complexity["ensemble"], complexity["paper"]
    paper_params = paper.get("subnetwork_parameters")
    rows = [
        ["sub-network parameters", f"{sub['parameters']:,}", f"{paper_params:,}" if paper_params else "—"],
        ["sub-network GFLOPs", f"{sub['flops'] / 1e9:.3f}", f"{paper['subnetwork_gflops']:.3f}"],
        ["sub-network storage (MiB)", f"{sub['storage_bytes'] / 2**20:.2f}", "—"],
        ["ensemble parameters", f"{ens['parameters']:,}", f"{5 * paper_params:,}" if paper_params else "—"],
        ["ensemble GFLOPs", f"{ens['flops'] / 1e9:.3f}", f"{5 * paper['subnetwork_gflops']:.3f}"],
        ["ensemble storage (MiB)", f"{ens['storage_bytes'] / 2**20:.2f}", "—"],
    ]
    return _table(["", "ours", "paper"], rows, f"{complexity['classes']} classes, {complexity['input_size']}px input, "
                  "counted by the paper's section IV-E formulas; the paper prints fewer FLOPs than its own formulas "
                  "give for this architecture.")


def _quality_section(quality: dict | None) -> str:
    if not quality:
        return "<p>The preprocessed dataset was not available to this step.</p>"
    funnel = [["images offered", _e(quality["offered"])], ["read (past stage 1)", _e(quality["readable"])],
              ["faces found (stage 3)", _e(quality["faces"])], ["landmarks found (stage 4), usable", _e(quality["landmarks"])],
              ["subjects", _e(quality["subjects"])]]
    text = _table(["", "images"], funnel)
    if not quality["rejects"]:
        return text + "<p>No image was rejected.</p>"
    text += "<h3>Rejects by reason</h3>" + _table(["reason", "images"], [[_e(r["reason"]), _e(r["images"])]
                                                                         for r in quality["rejects"]])
    for reject in quality["rejects"]:
        figures = []
        for example in reject["examples"]:
            caption = f"{example['image_id']}: {example['detail'] or reject['reason']}"
            if example["thumbnail"]:
                figures.append(f'<figure><img src="{png_data_uri(example["thumbnail"])}" alt="{_e(caption)}">'
                               f"<figcaption>{_e(caption)}</figcaption></figure>")
            else:
                figures.append(f"<figure><figcaption>{_e(caption)} (cannot be shown)</figcaption></figure>")
        text += f"<h3>{_e(reject['reason'])}: examples</h3><div class=thumbs>{''.join(figures)}</div>"
    return text


def _model_section(model: dict) -> str:
    rows = [[_e(k), f"<code>{_e(v)}</code>"] for k, v in model.items() if v]
    if not rows:
        return "<p>No model was registered or logged by this run (MLflow was off).</p>"
    return _table(["", "where"], rows, wrap=True)


def render_report(results: dict, reports_dir: str | Path, *, dataset: str, run: dict, complexity: dict | None = None,
                  complexity_text: str = "", quality: dict | None = None, model: dict | None = None,
                  synthetic: bool = False) -> str:
    """The page as text; pictures are read from `reports_dir` (confusion/, gradcam/, landmark_study/)."""
    reports = Path(reports_dir)
    title = f"ferpipe: {results['network'].upper()} on {dataset}" + (" (SYNTHETIC demo data)" if synthetic else "")
    ensemble = results["overall"]["accuracy"].get(ENSEMBLE)
    nav = "".join(f'<a href="#{key}">{_e(name)}</a>' for key, name in SECTIONS.items())
    optimistic = results.get("optimistic")
    banner = ""
    if optimistic:
        banner = (f"<p class=warn>Checkpoint selection: test-fold. Beside the strict figure this page shows an "
                  f"optimistic one, {_percent(optimistic['overall']['accuracy'].get(ENSEMBLE))}% "
                  f"({_e(OPTIMISTIC)}), from the same trainings. No model of this run is registered.</p>")
    gradcam = _fold_pictures(reports, "gradcam", results, "each test image, then each member's Grad-CAM and pick")
    body = [
        _section("run", _run_section(results, run)),
        _section("results", _results_section(results, dataset)),
        _section("confusion", _confusion_section(reports, results)),
        _section("misses", _misses_section(reports, results)),
        _section("gradcam", ("<p class=note>Rows are test images chosen across the classes; columns each part "
                             "network's heat map over the face and its pick.</p>"
                             f"<div class='figures wide'>{gradcam}</div>") if gradcam else "<p>No Grad-CAM pictures.</p>"),
        _section("groups", _groups_section(results.get("groups"))),
        _section("landmarks", _landmarks_section(results.get("landmark_study"), reports, results)),
        _section("complexity", _complexity_section(complexity, complexity_text)),
        _section("data-quality", _quality_section(quality)),
        _section("model", _model_section(model or {})),
    ]
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width,initial-scale=1">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body><main>"
            f"<header><h1>{_e(title)}</h1><p>Ensemble accuracy <b>{_percent(ensemble)}%</b> on "
            f"{results['overall']['images']} test images of {len(results['folds'])} folds.</p>{banner}<nav>{nav}</nav>"
            "</header>"
            + "".join(body) + "</main></body></html>\n")


def manifest_fingerprint(manifest) -> str:
    """SHA-256 over the manifest's (image id, content hash, status) rows: which data a train-eval run saw."""
    import hashlib

    rows = sorted(manifest[["image_id", "sha256", "status"]].astype(str).itertuples(index=False, name=None))
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def write_report(results: dict, reports_dir: str | Path, *, dataset: str, run: dict, dataset_dir=None,
                 model: dict | None = None, synthetic: bool = False) -> Path:
    """Measure complexity, read the data quality from `dataset_dir`'s manifest, write REPORT_FILE; its path."""
    from ferpipe.crossval.steps import read_predictions
    from ferpipe.data.manifest import read_manifest
    from ferpipe.evaluate.misses import misses_sheet
    from ferpipe.model.complexity import measure_complexity
    from ferpipe.preprocess.imaging import encode_png
    from ferpipe.preprocess.quality import data_quality

    classes = len(results["classes"])
    quality = data_quality(read_manifest(dataset_dir)) if dataset_dir else None
    predictions = sorted((Path(reports_dir) / "predictions").glob("fold*.csv"))  # aggregate_folds put them there
    if dataset_dir and predictions:
        sheet = misses_sheet(read_predictions(predictions), dataset_dir, results["classes"])
        if sheet is not None:
            (Path(reports_dir) / MISSES_FILE).write_bytes(encode_png(sheet))
    page = render_report(results, reports_dir, dataset=dataset, run=run,
                         complexity=measure_complexity(classes).as_dict(),
                         quality=quality, model=model, synthetic=synthetic)
    path = Path(reports_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
