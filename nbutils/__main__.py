"""Command line: build, describe, query and export a feature atlas.

    python -m nbutils atlas build [--model M] [--source S] [--windows N] [--window W] [--k K] [--frac F]
                                  [--layers 0,2] [--method M] [--threshold T] [--space S] [--out DIR] [--sae DIR] [--quiet]
    python -m nbutils atlas info DIR
    python -m nbutils atlas query DIR "SELECT layer, count(*) FROM features GROUP BY layer"
    python -m nbutils atlas export-site DIR OUT_DIR [--quiet]

`build` writes to the same default folder that the notebooks open (`atlas.default_path`) unless `--out` is given;
run again after an interruption, it resumes. With `--sae DIR` (a SAELens folder: `cfg.json` +
`sae_weights.safetensors`) the atlas is of that dictionary's latents at its hook's layer instead of the MLP neurons;
its default folder name ends in `-sae<weights hash>`. `export-site` writes the atlas's static site
(`site.export_site`): a folder to open from disk or put on any static host. A bad argument prints one line and exits
with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

_SPACES = ("embedding", "h")  # clustering.SPACES, without importing the numeric stack to print --help (tested equal)

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated integers, e.g. 0,2; got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m nbutils", description="Feature atlases of MLP neurons.")
    commands = parser.add_subparsers(dest="group", required=True, parser_class=_Parser)
    atlas = commands.add_parser("atlas", help="build, describe or query a feature atlas")
    sub = atlas.add_subparsers(dest="command", required=True, parser_class=_Parser)
    build = sub.add_parser("build", help="build (or resume) an atlas")
    build.add_argument("--model", default=None, help="model name or folder (default: $NBUTILS_MODEL or the offline model)")
    build.add_argument("--source", default=None, help="corpus source (default: $NBUTILS_SOURCE or 'offline')")
    build.add_argument("--windows", type=int, default=2000, help="corpus windows (default 2000)")
    build.add_argument("--window", type=int, default=64, help="tokens per window (default 64)")
    build.add_argument("--k", type=int, default=128, help="examples per neuron (default 128)")
    build.add_argument("--frac", type=float, default=0.75, help="keep examples with act >= frac * max (default 0.75)")
    build.add_argument("--layers", type=_layers, default=None, help="layers to cluster, e.g. 0,2 (default all)")
    build.add_argument("--method", default=None, help="clustering method (default: the measured default)")
    build.add_argument("--threshold", type=float, default=None, help="the method's threshold")
    build.add_argument("--space", default="embedding", choices=_SPACES,
                       help="what the examples are clustered as: the neuron embedding h ⊙ w (default) or h")
    build.add_argument("--out", default=None, help="atlas folder (default: the notebooks' folder in the cache)")
    build.add_argument("--sae", default=None, help="a SAELens folder: build the atlas of its latents (default: neurons)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    try:  # Ray options, when the scale-out module is there
        from nbutils import scale

        scale.add_ray_arguments(build)
    except (ImportError, AttributeError):
        pass
    info = sub.add_parser("info", help="describe an atlas")
    info.add_argument("path", help="atlas folder")
    query = sub.add_parser("query", help="run a SQL query (DuckDB) over an atlas's tables")
    query.add_argument("path", help="atlas folder")
    query.add_argument("sql", help="the query; views: neurons, examples, contexts, features, bands, similar_features, "
                       "windows, vocab (the window id is window_id)")
    query.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    export = sub.add_parser("export-site", help="write the atlas's static site (open index.html, or host the folder)")
    export.add_argument("path", help="atlas folder")
    export.add_argument("out", help="the site's folder: new, empty, or an earlier export (replaced)")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _build(args: argparse.Namespace) -> None:
    from nbutils import _env, atlas, data, models

    if getattr(args, "ray", False) and args.sae:
        raise ValueError("`--sae` must be used without `--ray`; got both. An atlas of latents is built in one process.")
    if getattr(args, "ray", False):
        from nbutils import scale

        result = scale.build_from_args(args)
    else:
        name = _env.switch(args.model, "NBUTILS_MODEL", models.DEFAULT_MODEL_NAME)
        source = data._source(args.source)
        model = models.load_model(name)
        windows = data.corpus_windows(model, n_windows=args.windows, window=args.window, source=source)
        sae = None
        if args.sae:
            from nbutils import dictionary

            sae = dictionary.load_dictionary(args.sae)
        out = args.out or atlas.default_path(model_name=str(name), source=source, n_windows=args.windows,
                                             window=args.window, layers=args.layers, k=args.k, frac=args.frac,
                                             method=args.method, threshold=args.threshold, space=args.space)
        if sae is not None and not args.out:
            out = out.with_name(f"{out.name}-sae{sae.fingerprint()[:8]}")
        result = atlas.build_atlas(model, windows, k=args.k, frac=args.frac, layers=args.layers, method=args.method,
                                   threshold=args.threshold, space=args.space, out=out, source=source,
                                   progress=not args.quiet, sae=sae)
    print(result.info())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad argument or unusable atlas)."""
    args = _parser().parse_args(argv)
    from nbutils.cache import CacheError

    try:
        if args.command == "build":
            _build(args)
        elif args.command == "export-site":
            from nbutils import site

            out = site.export_site(args.path, args.out, progress=not args.quiet)
            print(f"site written to {out} ({site.site_bytes(out) / 1e6:.1f} MB); open {out / 'index.html'}")
        else:
            from nbutils import atlas

            opened = atlas.Atlas.open(args.path)
            if args.command == "info":
                print(opened.info())
            else:
                table = opened.sql(args.sql)
                print(table.to_csv(index=False) if args.csv else table.to_string(index=False, max_rows=200))
    except (ValueError, TypeError, FileNotFoundError, ConnectionError, CacheError, ImportError) as err:
        print(f"python -m nbutils: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("python -m nbutils: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
