"""The ``codebridge`` command: one entry point, a subcommand per job. Heavy imports happen per subcommand."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from codebridge.config import ConfigError, load_config
from codebridge.data.sample import BadSampleError
from codebridge.files import atomic_write_text, check_writable

EPILOG = """\
typical session:
  codebridge data emoji                          # build the built-in benchmark (~5 min, once)
  codebridge train --config configs/emoji-fdt.yaml --set train.steps=500
  codebridge eval --model runs/emoji-fdt/model --data emoji-style:test --task retrieval --out r.json

Data specs name a built-in suite (emoji-style, emoji-concept, emoji-voice, emoji-trimodal, emoji-scenes,
emoji-clips, each with :train or :test) or a file: CSV/TSV (filepath/title columns), JSONL, or WebDataset
shards (dir/shard-{00000..00009}.tar).
"""


def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--config", required=required, help="YAML file or packaged recipe name (e.g. emoji-fdt; see configs/)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.lr=3e-4 --set data.modalities='[image, audio]'",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codebridge",
        description="Cross-modal representation learning through a shared discrete space.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="build, convert and check datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    emoji = data_sub.add_parser(
        "emoji",
        help="build the built-in emoji benchmark from npm packages and espeak-ng",
        description="Build images (google/twitter art), multilingual labels, spoken labels (espeak-ng), "
        "scenes with boxes and video clips. Idempotent: a second run checks and does nothing.",
    )
    emoji.add_argument("--out", type=Path, default=None, help="dataset folder (default $CODEBRIDGE_HOME/emoji)")
    emoji.add_argument("--limit", type=int, default=None, help="only N concepts, spread over all groups")
    emoji.add_argument("--scenes", type=int, default=1200, help="number of scenes (default 1200)")
    emoji.add_argument("--clips", type=int, default=1200, help="number of clips (default 1200)")
    emoji.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    emoji.add_argument("--seed", type=int, default=0)
    corpus = data_sub.add_parser(
        "corpus",
        help="build the multi-style emoji, icon and flag corpus from npm packages as WebDataset shards",
        description="Rasterise the same emoji concepts in every freely licensed art style on npm, named icon sets "
        "and flags, with several captions per image, into DIR/SUITE/SPLIT/shard-NNNNN.tar. Idempotent.",
    )
    corpus.add_argument("--out", type=Path, default=None, help="corpus folder (default $CODEBRIDGE_HOME/corpus)")
    corpus.add_argument("--styles", nargs="+", default=None, metavar="STYLE", help="only these sets (default all)")
    corpus.add_argument("--limit", type=int, default=None, help="only N concepts per set (for quick tests)")
    corpus.add_argument("--size", type=int, default=64, help="image edge in pixels (default 64)")
    corpus.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    corpus.add_argument("--seed", type=int, default=0)

    shard = data_sub.add_parser(
        "shard",
        help="convert any data spec into WebDataset tar shards",
        description="Write SOURCE (any spec) as WebDataset shards OUT/shard-NNNNN.tar, one sample per key.",
    )
    shard.add_argument("source", help="data spec to convert")
    shard.add_argument("out", type=Path, help="output folder")
    shard.add_argument("--samples-per-shard", type=int, default=1000)
    shard.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable samples")
    _add_config_args(shard)

    check = data_sub.add_parser(
        "check",
        help="validate a dataset and list every bad sample",
        description="Decode every sample of SPEC and list each problem (file, line/key, reason) with a summary.",
    )
    check.add_argument("spec", help="data spec to check")
    check.add_argument("--modalities", default=None, help="comma list to require, e.g. image,text")
    check.add_argument("--json", dest="json_out", type=Path, default=None, help="also write the report as JSON")
    _add_config_args(check)

    train = sub.add_parser(
        "train",
        help="train a model from a YAML recipe",
        description="Train; writes RUN/{config.yaml, metrics.jsonl, tensorboard/, checkpoints/, model/}. "
        "Multi-process: torchrun --nproc_per_node N -m codebridge train ...",
    )
    _add_config_args(train, required=False)
    train.add_argument("--resume", default=None, help="'latest' or a checkpoint folder to resume from")

    ev = sub.add_parser("eval", help="evaluate a trained model", description="Evaluate and write flat JSON metrics.")
    ev.add_argument("--model", required=True, type=Path, help="model folder (RUN/model)")
    ev.add_argument("--data", required=True, help="data spec, e.g. emoji-style:test")
    ev.add_argument(
        "--task",
        required=True,
        choices=["retrieval", "zeroshot", "linear-probe", "localization", "codes"],
    )
    ev.add_argument("--out", type=Path, default=None, help="JSON file for the metrics")
    ev.add_argument("--train-data", default=None, help="linear-probe: spec to fit on (default SPEC with :train)")
    ev.add_argument("--label", default=None, help="zeroshot/linear-probe: label name (default: group and subgroup)")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument(
        "--window", type=float, default=0.25, help="localization: window side over image side (default 0.25)"
    )
    ev.add_argument(
        "--fuse-on",
        default=None,
        metavar="VALSPEC",
        help="retrieval with a discrete bridge: also report fused scores (continuous + w * discrete) with w chosen "
        "on this validation spec, never on --data (keys fusion_weight, fused_*)",
    )
    ev.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="data.KEY=VALUE",
        help="how to read --data (the model fixes the rest), e.g. --set data.skip_bad=true "
        "--set data.csv_separator=';'",
    )

    loc = sub.add_parser(
        "localize",
        help="heatmaps: which image regions / video frames each word (or spoken frame) points at",
        description="Map every word of --text (or frames of --audio) onto --image patches (or --video frames) "
        "through the model's shared space, with no localization labels. Writes PNG panels and raw maps as JSON.",
    )
    loc.add_argument("--model", required=True, type=Path, help="model folder (RUN/model)")
    target = loc.add_mutually_exclusive_group(required=True)
    target.add_argument("--image", type=Path, help="image to localize in")
    target.add_argument("--video", type=Path, help="video to localize in (per-frame map)")
    query = loc.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help='caption, e.g. "a dog face left of a pizza"')
    query.add_argument("--audio", type=Path, help="speech file")
    loc.add_argument("--out", type=Path, default=Path("heat.png"), help="PNG to write (default heat.png)")
    loc.add_argument("--segments", type=int, default=4, help="audio: number of time segments to map (default 4)")
    loc.add_argument(
        "--method",
        choices=["tokens", "phrases", "windows"],
        default="tokens",
        help="tokens: each word's tokens inside the whole text (default); phrases: each word encoded alone; "
        "windows: each word's embedding against image crops centred on every patch (slower, sharpest on scenes; "
        "docs/localization.md)",
    )
    loc.add_argument("--window", type=float, default=0.25, help="windows: crop side over the image side (default 0.25)")

    report = sub.add_parser(
        "report",
        help="write one self-contained HTML page for a run",
        description="Training curves, retrieval tables, example queries with their top-5 results, localization "
        "heatmaps, code grids and usage, as one HTML file (no network needed to view it).",
    )
    report.add_argument("run_dir", type=Path, help="run folder (holds config.yaml, metrics.jsonl, model/)")
    report.add_argument("--out", type=Path, default=None, help="HTML file (default RUN_DIR/report.html)")
    report.add_argument("--queries", type=int, default=4, help="example queries to show (default 4)")
    report.add_argument("--max-samples", type=int, default=5000, help="validation items to search (default 5000)")

    _add_search_parsers(sub)
    _add_convert_parsers(sub)

    demo = sub.add_parser(
        "demo",
        help="the whole pipeline on the built-in data: build, train, evaluate, report",
        description="Build the emoji data if missing, train a small model (default: FDT, 8 minutes), evaluate "
        "retrieval, zero-shot and localization, write the HTML report, and print where it is.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    demo.add_argument("--recipe", default="emoji-fdt", help="recipe to train (default emoji-fdt)")
    demo.add_argument("--minutes", type=float, default=8.0, help="training budget in minutes (default 8)")
    demo.add_argument("--data-root", type=Path, default=None, help="codebridge home holding emoji/ (default ~/.cache)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _add_convert_parsers(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser("convert", help="convert other libraries' checkpoints into pretrained towers")
    convert_sub = convert.add_subparsers(dest="convert_command", required=True, metavar="FORMAT")
    openclip = convert_sub.add_parser(
        "openclip",
        help="an OpenCLIP ViT checkpoint -> a transformers CLIP folder (hf-vision / hf-text)",
        description="Rename the keys of an OpenCLIP checkpoint (a ViT image tower and OpenCLIP's text transformer;\n"
        "ResNet, timm or Hugging Face towers, CoCa and SigLIP are refused) into a transformers CLIPModel folder\n"
        "with its image preprocessing and, from CLIP's BPE file, its tokenizer. open_clip is not imported.",
        epilog="example:\n"
        "  codebridge convert openclip --checkpoint open_clip_pytorch_model.bin "
        "--config open_clip/model_configs/ViT-B-32.json --bpe bpe_simple_vocab_16e6.txt.gz --out towers/vit-b-32\n"
        "then: model.image: {encoder: hf-vision, path: towers/vit-b-32}, "
        "model.text: {encoder: hf-text, path: towers/vit-b-32}\n"
        "The BPE file ships in the open_clip_torch wheel: pip install --no-deps open_clip_torch makes it found "
        "without --bpe.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    openclip.add_argument(
        "--checkpoint", required=True, type=Path, help="state dict: .safetensors, or .pt/.bin (torch.save)"
    )
    openclip.add_argument(
        "--config",
        required=True,
        type=Path,
        help="OpenCLIP's model config JSON (open_clip/model_configs/NAME.json, or the hub's open_clip_config.json)",
    )
    openclip.add_argument(
        "--bpe", type=Path, default=None, help="CLIP's bpe_simple_vocab_16e6.txt.gz (default: open_clip_torch's)"
    )
    openclip.add_argument("--out", required=True, type=Path, help="folder to write (replaced as a whole)")


def _add_search_parsers(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser(
        "index",
        help="embed a collection into a search index (resumable; torchrun for several processes)",
        description="Embed one modality of SPEC in numbered parts (a rerun continues where a killed one stopped), "
        "then merge them with a metadata table and a FAISS index. docs/search.md",
    )
    index.add_argument("--model", required=True, type=Path, help="model folder (RUN/model)")
    index.add_argument("--data", required=True, help="data spec of the collection (CSV/TSV, JSONL, shards, suite)")
    index.add_argument("--out", required=True, type=Path, help="index folder to write")
    index.add_argument("--modality", default=None, help="modality to index (default: the model's first non-text one)")
    index.add_argument("--batch-size", type=int, default=64)
    index.add_argument("--part-size", type=int, default=1024, help="items per resumable part (default 1024)")
    index.add_argument("--ann", default="auto", help="auto (flat up to 50k items, else IVF), flat, ivf, ivfpq, hnsw")
    index.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable items")

    search = sub.add_parser("search", help="query an index from the command line", description="Print the top hits.")
    search.add_argument("--index", required=True, type=Path, help="index folder (from codebridge index)")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a caption to search for")
    query.add_argument("--image", type=Path, help="an image file to search with")
    query.add_argument("--audio", type=Path, help="an audio file to search with")
    query.add_argument("--id", dest="item_id", type=int, help="an item of the index: find its neighbours")
    search.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    search.add_argument("--model", type=Path, default=None, help="model folder (default: the one that built it)")
    search.add_argument(
        "--mode",
        choices=["dense", "sparse", "hybrid"],
        default="dense",
        help="dense (FAISS, default), sparse (through the shared codes), hybrid (both scores summed)",
    )
    search.add_argument("--explain", action="store_true", help="list the shared codes each hit matched")
    search.add_argument("--json", dest="as_json", action="store_true", help="print the hits as JSON")

    serve = sub.add_parser(
        "serve",
        help="serve an index: JSON API and a search page",
        description="HTTP JSON API (/search, /items/ID, /health, /info) and a web page at /. docs/search.md",
    )
    serve.add_argument("--index", required=True, type=Path, help="index folder (from codebridge index)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default 10 MB)")


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "emoji":
        from codebridge.data.emoji.build import build_emoji

        manifest = build_emoji(
            out=args.out,
            limit=args.limit,
            n_scenes=args.scenes,
            n_clips=args.clips,
            workers=args.workers,
            seed=args.seed,
        )
        print(json.dumps(manifest["counts"], indent=2))
        return 0
    if args.data_command == "corpus":
        from codebridge.data.corpus.build import build_corpus

        manifest = build_corpus(
            out=args.out, styles=args.styles, limit=args.limit, size=args.size, workers=args.workers, seed=args.seed
        )
        print(json.dumps(manifest["counts"], indent=2))
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.data_command == "shard":
        from codebridge.data.shard import write_shards

        cfg.data.skip_bad = cfg.data.skip_bad or args.skip_bad
        paths = write_shards(args.source, args.out, cfg.data, samples_per_shard=args.samples_per_shard)
        print(f"wrote {len(paths)} shard(s) to {args.out}")
        return 0
    from codebridge.data.check import check_dataset

    modalities = args.modalities.split(",") if args.modalities else None
    if args.json_out:
        check_writable(args.json_out)
    report = check_dataset(args.spec, cfg, modalities=modalities)
    print(report.render())
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(report.to_dict(), indent=2))
    return 0 if report.ok else 1


def _cmd_train(args: argparse.Namespace) -> int:
    from codebridge.train.trainer import LostContact, TrainingDiverged, train

    cfg = load_config(args.config, args.overrides)
    try:
        run_dir = train(cfg, resume=args.resume)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except LostContact as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    print(f"run folder: {run_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from codebridge.eval.run import evaluate

    if args.out:
        check_writable(args.out)  # before minutes of computing, not after
    metrics = evaluate(
        args.model,
        args.data,
        args.task,
        train_spec=args.train_data,
        label=args.label,
        batch_size=args.batch_size,
        window=args.window,
        overrides=args.overrides,
        fuse_on=args.fuse_on,
    )
    text = json.dumps(metrics, indent=2)
    print(text, flush=True)  # first, so a write that fails after all still loses nothing computed
    if args.out:
        atomic_write_text(args.out, text)
    return 0


def _cmd_localize(args: argparse.Namespace) -> int:
    from codebridge.localize import localize_cli

    check_writable(args.out)
    result = localize_cli(
        args.model,
        image=args.image,
        text=args.text,
        audio=args.audio,
        video=args.video,
        out=args.out,
        segments=args.segments,
        method=args.method,
        window=args.window,
    )
    print(f"heatmaps: {result['png']}\nraw maps: {result['json']}")
    if result["skipped"]:
        print(f"skipped (past the text context length): {', '.join(result['skipped'])}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from codebridge.report import build_report

    check_writable(args.out or args.run_dir / "report.html")
    path = build_report(args.run_dir, out=args.out, queries=args.queries, max_samples=args.max_samples)
    print(f"report: {path}")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from codebridge.search.index import build_index

    out = build_index(
        args.model,
        args.data,
        args.out,
        args.modality,
        batch_size=args.batch_size,
        part_size=args.part_size,
        skip_bad=args.skip_bad,
        ann=args.ann,
    )
    print(f"index: {out}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from codebridge.search.output import format_table
    from codebridge.search.searcher import BadQuery, Searcher

    searcher = Searcher(args.index, args.model)
    try:
        if args.item_id is not None:
            hits = searcher.similar(args.item_id, args.k, args.mode, args.explain)
        else:
            modality, value = next((m, v) for m in ("text", "image", "audio") if (v := getattr(args, m)) is not None)
            if modality != "text" and not value.is_file():
                raise FileNotFoundError(f"--{modality} {value} does not exist")
            value = value if modality == "text" else str(value)
            hits = searcher.search(modality, value, args.k, args.mode, args.explain)
    except BadQuery as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(hits, indent=1) if args.as_json else format_table(hits))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from codebridge.search.api import serve

    serve(args.index, host=args.host, port=args.port, max_upload=int(args.max_upload_mb * 1e6))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from codebridge.models.encoders.openclip_convert import convert

    if not convert(args.checkpoint, args.config, args.out, bpe=args.bpe):
        print(
            f"note: no tokenizer written (no --bpe, open_clip_torch not installed): {args.out} serves hf-vision "
            "only; for hf-text rerun with --bpe bpe_simple_vocab_16e6.txt.gz or pip install --no-deps open_clip_torch",
            file=sys.stderr,
        )
    print(f"wrote {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from codebridge.demo import run_demo

    run_demo(out=args.out, recipe=args.recipe, minutes=args.minutes, data_root=args.data_root, overrides=args.overrides)
    return 0


COMMANDS = {
    "data": _cmd_data,
    "train": _cmd_train,
    "eval": _cmd_eval,
    "localize": _cmd_localize,
    "report": _cmd_report,
    "demo": _cmd_demo,
    "convert": _cmd_convert,
    "index": _cmd_index,
    "search": _cmd_search,
    "serve": _cmd_serve,
}


# Errors of the place written to (not of the program): one line naming the file, what is wrong and what to do.
CANNOT_WRITE = {
    errno.ENOSPC: "cannot write {}: the disk is full; free some space or write elsewhere",
    errno.EDQUOT: "cannot write {}: the disk quota is exhausted; free some space or write elsewhere",
    errno.EROFS: "cannot write {}: the file system is read-only; write elsewhere",
    errno.EACCES: "cannot access {}: permission denied; fix its permissions or write elsewhere",
    errno.EPERM: "cannot access {}: operation not permitted; fix its permissions or write elsewhere",
    errno.EISDIR: "cannot write {}: it is a folder; give a file name",
}


def cannot_write(exc: OSError) -> str | None:
    """The one-line message for an ``OSError`` of the file system written to, or None for any other error."""
    if exc.errno not in CANNOT_WRITE:
        return None
    return (
        CANNOT_WRITE[exc.errno].format(exc.filename or "a file")
        + " (a run: --set output_dir=..., other commands: --out); files written before are intact"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, BadSampleError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: stop quietly
        sys.stderr.close()
        return 0
    except OSError as exc:
        if (message := cannot_write(exc)) is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
