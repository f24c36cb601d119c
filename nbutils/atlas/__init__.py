"""The feature atlas: a model's feature clusters computed once, then read and queried without the model.

`build_atlas(model, windows, ...)` runs every heavy step once and writes one self-describing folder:

- `collect`: the streaming top-k collection (`activations.collect_top_activations`, which resumes from its own
  checkpoints), stored as `top.parquet` (every filled top-k slot), with the windows (`windows.parquet`) and the
  text of every token id (`vocab.parquet`) so that any example can be shown without the corpus or the tokenizer.
- per layer, `clusters`: every neuron's examples clustered (`clustering`, the default method unless another is
  asked for) into `neurons/`, `examples/`, `contexts/` (the neuron's activation on the tokens around each example
  a tab shows, so a tab is drawn with no forward pass), `vectors/` (each feature's central neuron embedding) and
  `bands/` (examples below the top: a deterministic sample per neuron and activation band, as `bands` draws it,
  with the same context activations, taken in the same pass);
- per layer, `features`: one row per cluster of at least `min_size` examples, with a readable label, into
  `features/`;
- `similar`: every feature's nearest features of other neurons, in the same layer and in other layers, by cosine
  similarity of their central neuron embeddings, scored by shared examples and cross activation, into
  `similar.parquet`.

`manifest.json` records the model (name, fingerprint), the corpus (source, windows, window length, fingerprint),
the settings, the package versions and each step's status and files. Every parquet file carries the atlas key's
hash in its metadata and its row count in the manifest: a truncated, foreign or half-written file raises
`cache.CacheError` naming it, and is never used.

**Resumable.** Files are written atomically (temporary file, then rename) and a step is marked done in the
manifest only after its files are. A build that is killed at any point and started again with the same
arguments verifies the finished steps, never redoes them, and resumes at the first unfinished (layer, step);
the collection itself resumes from its last checkpoint. The result is identical to an uninterrupted build.

**Three forward passes.** The collection, one pass that reads every clustered layer (`layers_tables`: each block
runs once, however many layers), and one for the cross activations of the similar step. Clustering a layer runs
in `workers` processes on blocks of neurons (`cluster_layer`), with the same result for any number of workers.

**Memory** is bounded by a budget (`layers_tables`, 1 GiB by default) plus one layer, and never holds more than
one layer's activations of a batch: the collection state (`n_layers * d_mlp * k` slots, 20 bytes each), the
pre-MLP vectors of each layer's distinct examples (`<= n_windows * window * d_model` float32: all tokens, at
large k; the layers beyond the budget are written to temporary files during the pass and read back one at a
time) with their context activations, and one layer's tables while it is clustered. The similar step holds
the central embedding of every feature (`n_features * d_model` float32), every feature's example keys, and
`n_features * n_similar * CROSS_MEMBERS` cross-activation requests, and streams the windows once for them.

**Reading.** `Atlas.open(path)` needs no model. Tables are queried through DuckDB (embedded, no server) straight
from the parquet files, so a query over millions of example rows loads only what it returns:
`atlas.sql("SELECT ...")`, `atlas.search(token=..., text=...)`, `atlas.most_polysemantic(n)`. In SQL the `similar`
table is the view `similar_features` and the `window` column is `window_id` (both stored names are SQL keywords).

**Modules.** `settings` (what the content depends on), `layers` (the per-layer `clusters` and `features` steps),
`similar_features` (the `similar` step), `folder` (files, key stamps, manifest), `build` (the steps in order,
`default_path`, `load_or_build`), `reader` (`Atlas`, SQL), `labels` (token text and labels), `units` (what is read
for the units: MLP neurons, or a sparse dictionary's latents). Every forward pass goes through `passes.read_layers`.

**Latents.** `build_atlas(model, windows, sae=folder)` builds the same tables for the latents of a sparse dictionary
(a SAELens folder, `nbutils.dictionary`) at its hook's layer: `neuron` is the latent, its embedding
`u ⊙ W_enc[:, j]`; the manifest records the dictionary's config and weight hash (part of the key).

Columns (in addition to those of `activations`):

- `neurons`: `layer, neuron, max_act, n_examples, dead, n_clusters, n_singletons, effective_clusters,
  monosemanticity, largest_cluster, label`.
- `examples`: `layer, neuron, window, pos, act, cluster, is_central, shown, token_id, token, context, x, y`
  (`shown`: listed in a tab, with its activations in `contexts`; `context`: the text of up to `TEXT_CONTEXT`
  tokens ending at the activating token; `x, y`: the example's place in the neuron's 2-D map, PCA of the unit
  neuron embeddings).
- `contexts`: `layer, neuron, window, pos, start, acts` (the neuron's activation on tokens `start..` of the window).
- `features`: `layer, neuron, cluster, size, window, pos, act, mean_act, label` (window/pos/act: the central
  example).
- `similar`: `layer, neuron, cluster, rank, other_layer, other_neuron, other_cluster, other_size, similarity,
  shared_examples` (Jaccard overlap of the example sets), `cross_act` (mean activation of the other feature's
  neuron on up to `CROSS_MEMBERS` of this feature's examples, over that neuron's max activation).
"""

from nbutils.atlas.build import build_atlas, default_path, load_or_build
from nbutils.atlas.labels import token_label, token_labels
from nbutils.atlas.layers import ClusteredLayer, cluster_layer, features_table, layer_tables, layers_tables
from nbutils.atlas.reader import SQL_COLUMNS, SQL_VIEWS, Atlas
from nbutils.atlas.settings import CROSS_MEMBERS, FORMAT, LABEL_TOKENS, TABLES, TEXT_CONTEXT, AtlasSettings, LayerTables
from nbutils.atlas.similar_features import EXAMPLE_COLUMNS, similar_table
from nbutils.atlas.units import NEURONS, Units

__all__ = [
    "FORMAT",
    "TABLES",
    "TEXT_CONTEXT",
    "CROSS_MEMBERS",
    "LABEL_TOKENS",
    "EXAMPLE_COLUMNS",
    "SQL_VIEWS",
    "SQL_COLUMNS",
    "AtlasSettings",
    "LayerTables",
    "Units",
    "NEURONS",
    "ClusteredLayer",
    "Atlas",
    "build_atlas",
    "cluster_layer",
    "layer_tables",
    "layers_tables",
    "features_table",
    "similar_table",
    "token_label",
    "token_labels",
    "default_path",
    "load_or_build",
]
