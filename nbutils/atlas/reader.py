"""Reading a finished atlas without the model: `Atlas.open(path)`, its tables, and SQL over them (DuckDB).

SQL names. The views are `neurons, examples, contexts, features, bands, similar_features, windows, vocab`, and the
window id column is `window_id` in SQL: `similar` and `window` are SQL keywords, so plain queries such as
`SELECT window_id, pos FROM examples` or `SELECT * FROM similar_features` work as typed. The files keep the
package's column name `window` (DESIGN §8); the views rename it on read, so atlases built before this naming open
the same way, and the old view name stays as `"similar"` (quoted) for queries written against it. The reader's
own methods (`table`, `neuron_examples`, ...) return the package's names (`window`), as every DataFrame does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from nbutils import activations, cache, clustering
from nbutils._validation import check_choice, check_int_range, fail
from nbutils.atlas.folder import Folder, check_path_arg, layer_file, read_manifest, read_top, step_names
from nbutils.atlas.settings import AtlasSettings
from nbutils.cache import CacheError

__all__ = ["Atlas", "SQL_VIEWS", "SQL_COLUMNS"]

SQL_VIEWS = {"similar": "similar_features"}  # stored table -> its view in SQL (the stored name is a keyword)
SQL_COLUMNS = {"window": "window_id"}  # stored column -> its name in SQL (the stored name is a keyword)
_PER_LAYER = ("neurons", "examples", "contexts", "features", "bands")


class Atlas:
    """A finished atlas folder, read without the model. Tables are parquet files queried through DuckDB.

    Attributes:
        path: the folder; manifest: its `manifest.json`; settings: the `AtlasSettings`;
        n_layers, d_mlp, d_model: the model's sizes (`d_mlp`: the dictionary's `d_sae` in an atlas of latents);
        layers: the clustered layers; dictionary: what the manifest records of the dictionary whose latents the
        atlas holds (None for neurons); loaded_from_cache: True when `load_or_build` found it finished.
    """

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest
        self.settings = AtlasSettings(**manifest["settings"])
        m = manifest["model"]
        self.n_layers, self.d_mlp, self.d_model = int(m["n_layers"]), int(m["d_mlp"]), int(m["d_model"])
        self.layers: list[int] = list(manifest["layers"])
        self.dictionary: dict | None = manifest.get("dictionary")
        if self.dictionary:
            self.d_mlp = int(self.dictionary["d_sae"])  # the units of its one layer are the latents
        self.loaded_from_cache = False
        self._con: Any = None
        self._windows: Tensor | None = None
        self._vocab: list[str] | None = None
        self._top: Any = None
        self._model: Any = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Atlas":
        """Open a finished atlas; every file is checked (readable, this atlas's key, recorded row count).

        Raises:
            FileNotFoundError: no atlas there. cache.CacheError: unfinished, damaged or foreign files.
        """
        folder = check_path_arg("path", path)
        manifest = read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(f"No atlas at {folder} (no manifest.json). Build one with "
                                    "`atlas.build_atlas(model, windows, out=...)` or `python -m nbutils atlas build`.")
        f = Folder(folder, manifest)
        missing = [s for s in step_names(manifest["layers"]) if not f.done(s)]
        if missing or manifest.get("status") != "complete":
            raise CacheError(f"The atlas at {folder} is unfinished (next step: {missing[0] if missing else 'none'}). "
                             "Run the same build again to resume it.")
        return cls(folder, manifest)

    def __repr__(self) -> str:
        c = self.manifest["corpus"]
        return (f"Atlas({str(self.path)!r}: {self.manifest['model']['name']}, {self.n_layers} layers x {self.d_mlp} "
                f"neurons, {c['n_windows']} windows x {c['window']} tokens, k={self.settings.k}, "
                f"{self.settings.method} at {self.settings.threshold} on {clustering.SPACE_NAMES[self.settings.space]})")

    # ------------------------------------------------------------------ SQL

    @property
    def con(self) -> Any:
        """The DuckDB connection, with one view per table under its SQL name (module docstring): `neurons,
        examples, contexts, features, bands, similar_features, windows, vocab`; `window` is `window_id`."""
        if self._con is None:
            import duckdb

            con = duckdb.connect(":memory:")
            con.execute("SET threads TO 2")
            tables = [t for t in _PER_LAYER if t != "bands" or self.settings.bands] + ["similar", "windows", "vocab"]
            for table in tables:
                per_layer = table in _PER_LAYER
                files = self.path / table / "layer=*.parquet" if per_layer else self.path / f"{table}.parquet"
                source = f"read_parquet('{str(files).replace(chr(39), chr(39) * 2)}')"
                first = self.path / (layer_file(table, self.layers[0]) if per_layer else f"{table}.parquet")
                select = self._sql_columns(first)
                con.execute(f"CREATE VIEW {SQL_VIEWS.get(table, table)} AS SELECT {select} FROM {source}")
                if table in SQL_VIEWS:  # the stored name too, for queries that quote it
                    con.execute(f'CREATE VIEW "{table}" AS SELECT * FROM {SQL_VIEWS[table]}')
            self._con = con
        return self._con

    @staticmethod
    def _sql_columns(file: Path) -> str:
        """The select list of a view: the file's columns in order, keywords renamed (`SQL_COLUMNS`)."""
        import pyarrow.parquet as pq

        names = pq.read_schema(file).names
        return ", ".join(f'"{c}" AS {SQL_COLUMNS[c]}' if c in SQL_COLUMNS else f'"{c}"' for c in names)

    def _frame(self, query: str, params: list | None = None) -> pd.DataFrame:
        """`sql` with the package's column names (`window`), for the methods that return tables."""
        return self.sql(query, params).rename(columns={v: k for k, v in SQL_COLUMNS.items()})

    def sql(self, query: str, params: list | dict | None = None) -> pd.DataFrame:
        """Run a SQL query over the atlas's views (DuckDB) and return a DataFrame.

        `atlas.sql("SELECT layer, count(*) FROM features GROUP BY layer")`; `params` fills `?` or `$name`.
        Views and columns go by their SQL names (module docstring): `similar_features`, `window_id`.
        """
        if not isinstance(query, str) or not query.strip():
            raise TypeError(f"`query` must be a SQL string; got {query!r}.")
        import duckdb

        try:
            return self.con.execute(query, params).df() if params is not None else self.con.execute(query).df()
        except duckdb.Error as err:
            message = " ".join(str(err).split())  # DuckDB's message spans lines: keep it on one
            raise ValueError(f"`query` failed: {message}") from None

    def table(self, name: str, layer: int | None = None) -> pd.DataFrame:
        """A whole table (of one layer, for the per-layer tables) as a DataFrame."""
        check_choice("name", name, ("neurons", "examples", "contexts", "features", "similar"))
        if layer is None:
            return self._frame(f"SELECT * FROM {SQL_VIEWS.get(name, name)}" + (
                " ORDER BY layer, neuron" if name != "similar" else " ORDER BY layer, neuron, cluster, rank"))
        layer = self._check_layer(layer)
        if name == "similar":
            return self.sql("SELECT * FROM similar_features WHERE layer = ?", [layer])
        return pd.read_parquet(self.path / layer_file(name, layer))

    def _check_layer(self, layer: Any) -> int:
        layer = check_int_range("layer", layer, 0, self.n_layers - 1, what="for this model")
        if layer not in self.layers:
            fail("layer", f"be one of the atlas's layers {self.layers}", layer, "Build the atlas with that layer.")
        return layer

    def _check_neuron(self, neuron: Any) -> int:
        return check_int_range("neuron", neuron, 0, self.d_mlp - 1, what="for this model (d_mlp)")

    # ------------------------------------------------------------------ questions

    def most_polysemantic(self, n: int = 10, layer: int | None = None, *, min_examples: int = 10) -> pd.DataFrame:
        """The `n` neurons with the most effective clusters (ties: lower monosemanticity), of one layer or all,
        among neurons with at least `min_examples` examples."""
        n = check_int_range("n", n, 1, 10**9)
        min_examples = check_int_range("min_examples", min_examples, 0, 10**9)
        where, params = "n_examples >= ?", [min_examples]
        if layer is not None:
            where += " AND layer = ?"
            params.append(self._check_layer(layer))
        return self.sql(f"SELECT * FROM neurons WHERE {where} ORDER BY effective_clusters DESC, monosemanticity ASC, "
                        f"layer, neuron LIMIT {n}", params)

    def search(self, token: str | None = None, text: str | None = None, *, layer: int | None = None,
               limit: int = 20) -> pd.DataFrame:
        """Features whose activating tokens equal `token` (spaces around it ignored, any case) and/or whose
        examples' contexts contain `text` (any case), most matching examples first.

        Returns:
            `layer, neuron, cluster, size, label, matches` (examples of the feature that match), at most `limit`.
        """
        if token is None and text is None:
            fail("token", "be given (or `text`)", "neither", "Pass token='...' or text='...'.")
        for name, value in (("token", token), ("text", text)):
            if value is not None and (not isinstance(value, str) or not value):
                fail(name, "be a non-empty string", repr(value))
        limit = check_int_range("limit", limit, 1, 10**6)
        where, params = [], []
        if token is not None:
            where.append("lower(trim(e.token)) = lower(trim(?))")
            params.append(token)
        if text is not None:
            where.append("contains(lower(e.context), lower(?))")
            params.append(text)
        if layer is not None:
            where.append("e.layer = ?")
            params.append(self._check_layer(layer))
        return self.sql(
            "SELECT f.layer, f.neuron, f.cluster, f.size, f.label, count(*) AS matches "
            "FROM examples e JOIN features f USING (layer, neuron, cluster) "
            f"WHERE {' AND '.join(where)} GROUP BY ALL ORDER BY matches DESC, f.size DESC, f.layer, f.neuron, "
            f"f.cluster LIMIT {limit}", params)

    def neuron(self, layer: int, neuron: int) -> dict:
        """The `neurons` row of one neuron as a dict."""
        layer, neuron = self._check_layer(layer), self._check_neuron(neuron)
        rows = self.sql("SELECT * FROM neurons WHERE layer = ? AND neuron = ?", [layer, neuron])
        return rows.iloc[0].to_dict()

    def neuron_examples(self, layer: int, neuron: int) -> pd.DataFrame:
        """One neuron's `examples` rows, highest activation first."""
        layer, neuron = self._check_layer(layer), self._check_neuron(neuron)
        return self._frame("SELECT * FROM examples WHERE layer = ? AND neuron = ? ORDER BY act DESC, window_id",
                        [layer, neuron])

    def neuron_contexts(self, layer: int, neuron: int) -> pd.DataFrame:
        """One neuron's `contexts` rows (the shown examples' activations around the activating token)."""
        layer, neuron = self._check_layer(layer), self._check_neuron(neuron)
        return self._frame("SELECT window_id, pos, start, acts FROM contexts WHERE layer = ? AND neuron = ?",
                           [layer, neuron])

    def band_examples(self, layer: int, neuron: int, band: int | None = None) -> pd.DataFrame:
        """One neuron's sampled examples below the top (`bands` table), highest band first; one band or all.
        Empty when the atlas was built with `bands=0`."""
        layer, neuron = self._check_layer(layer), self._check_neuron(neuron)
        if not self.settings.bands:
            return pd.DataFrame(columns=["layer", "neuron", "band", "window", "pos", "act", "token", "start", "acts"])
        if band is None:
            return self._frame("SELECT * FROM bands WHERE layer = ? AND neuron = ? ORDER BY band DESC, act DESC",
                            [layer, neuron])
        band = check_int_range("band", band, 0, self.settings.bands - 1, what="(the atlas's bands)")
        return self._frame("SELECT * FROM bands WHERE layer = ? AND neuron = ? AND band = ? ORDER BY act DESC",
                        [layer, neuron, band])

    def similar_to(self, layer: int, neuron: int, cluster: int | None = None) -> pd.DataFrame:
        """Similar features of one neuron's features (one cluster, or all), most similar first."""
        layer, neuron = self._check_layer(layer), self._check_neuron(neuron)
        if cluster is None:
            return self.sql("SELECT * FROM similar_features WHERE layer = ? AND neuron = ? ORDER BY cluster, rank",
                            [layer, neuron])
        cluster = check_int_range("cluster", cluster, 0, 10**9)
        return self.sql("SELECT * FROM similar_features WHERE layer = ? AND neuron = ? AND cluster = ? ORDER BY rank",
                        [layer, neuron, cluster])

    # ------------------------------------------------------------------ windows and tokens

    @property
    def windows(self) -> Tensor:
        """The corpus windows `[n_windows, window]` the atlas was built on."""
        if self._windows is None:
            table = pd.read_parquet(self.path / "windows.parquet")
            self._windows = torch.as_tensor(np.stack(table["tokens"].to_numpy()).astype(np.int64))
        return self._windows

    @property
    def vocab(self) -> list[str]:
        """The text of every token id."""
        if self._vocab is None:
            self._vocab = pd.read_parquet(self.path / "vocab.parquet")["token"].tolist()
        return self._vocab

    def str_tokens(self, window: int) -> list[str]:
        """Token strings of one window."""
        window = check_int_range("window", window, 0, len(self.windows) - 1, what="(a window of this atlas)")
        vocab = self.vocab
        return [vocab[t] for t in self.windows[window].tolist()]

    @property
    def top(self) -> activations.TopActivations:
        """The collection (`activations.TopActivations`) as stored in the atlas."""
        if self._top is None:
            self._top = read_top(Folder(self.path, self.manifest))
        return self._top

    def polysemy(self, layer: int | None = None) -> pd.DataFrame:
        """The polysemy rows of `neurons` (`clustering.POLYSEMY_COLUMNS` plus `max_act, label`)."""
        if layer is None:
            return self.sql("SELECT * FROM neurons ORDER BY layer, neuron")
        return self.table("neurons", layer)

    # ------------------------------------------------------------------ the model, only when needed

    def check_model(self, model: Any) -> Any:
        """`model` if its weights are the ones the atlas was built from; else ValueError."""
        found = cache.model_fingerprint(model)
        if found != self.manifest["model"]["fingerprint"]:
            fail("model", "have the weights the atlas was built from", f"fingerprint {found[:12]} (atlas: "
                 f"{self.manifest['model']['fingerprint'][:12]})", "Load the model named in the atlas's manifest.")
        return model

    def load_model(self) -> Any:
        """The model the atlas was built from, loaded on first use (for token importance and live re-clustering)
        and checked against the atlas's fingerprint."""
        if self._model is None:
            from nbutils import models

            self._model = self.check_model(models.load_model(self.manifest["model"]["name"]))
        return self._model

    def info(self) -> str:
        """A few lines describing the atlas: model, corpus, settings, steps, sizes."""
        m, c, s = self.manifest["model"], self.manifest["corpus"], self.settings
        counts = self.sql('SELECT (SELECT count(*) FROM neurons) AS neurons, (SELECT count(*) FROM examples) AS '
                          'examples, (SELECT count(*) FROM features) AS features, (SELECT count(*) FROM similar_features) AS '
                          'similar').iloc[0]
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        seconds = sum(step.get("seconds", 0.0) for step in self.manifest["steps"].values())
        return "\n".join([
            f"atlas     {self.path}",
            f"model     {m['name']} ({m['n_layers']} layers x {m['d_mlp']} neurons, d_model {m['d_model']}; "
            f"fingerprint {m['fingerprint'][:12]})",
            f"corpus    {c['source']}: {c['n_windows']} windows x {c['window']} tokens (fingerprint {c['fingerprint'][:12]})",
            f"settings  k={s.k} frac={s.frac} method={s.method} threshold={s.threshold} space={s.space} "
            f"fold_ln={s.fold_ln} min_size={s.min_size}",
            f"layers    {self.layers}",
            *([f"units     latents of {self.dictionary['saelens_hook']} ({self.dictionary['architecture']}, "
               f"d_sae {self.dictionary['d_sae']}; weights sha256 {self.dictionary['weights_hash'][:12]})"]
              if self.dictionary else []),
            f"tables    {counts['neurons']:,} neurons, {counts['examples']:,} examples, {counts['features']:,} "
            f"features, {counts['similar']:,} similar pairs",
            f"size      {size / 1e6:.1f} MB on disk; steps took {seconds:.1f} s",
        ])
