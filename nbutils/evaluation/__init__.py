"""How well the clustering recovers what a neuron reads: ground truth, method choice, spaces, sweeps.

`clustering` clusters; this package measures it, one module per idea: `planted` (generators with known
features), `method_choice` (scores, the grid, the default chosen leave one family out), `virtual_neurons` (ground
truth on the model's real activations) and `real_model` (sweeps without ground truth). Every public name is also
here, as `evaluation.<name>`.

- Planted features (`make_planted_features`): synthetic examples of one neuron drawn from known features
  that share a common direction, with noise, outliers, unequal sizes and unequal strengths.
  `compare_methods` scores every method and threshold on one generator by the adjusted Rand index (ARI).
- Generator families (`FAMILIES`, `score_families`): five generators that differ in noise, shared
  component, spread of feature scales, outliers, dimension and cluster sizes, each with 1 to 6 features.
  `family_summary` scores a setting per family against `TARGET`; `leave_one_family_out` chooses the default
  without one family and scores it on that family.
- Virtual neurons (`make_virtual_neurons`, `collect_virtual_examples`, `score_virtual_neurons`): ground truth
  on the model's real activations. A virtual neuron reads 2-4 monosemantic neurons of a layer (plain or gated
  MLP; `VirtualNeurons` says how); each of its top examples is labelled by the source that drives it most,
  and clusters in three spaces (`SPACES`) are scored against those labels (ARI, homogeneity, completeness,
  V-measure) beside a nearest-neighbour vote. For a gated MLP the embedding space takes a `kind`
  (`embeddings.KINDS`), so the kinds can be compared on the same examples. `virtual_family_scores` turns
  them into a sixth family.
- A real model without ground truth: `threshold_sweep` (how a layer's clusters change with the threshold)
  and `compare_spaces` (the same examples clustered in three spaces, scored against tokens).
"""


from nbutils.evaluation.method_choice import (DEFAULT_GRID, TARGET, choose_default, compare_methods, family_summary,
                                              leave_one_family_out, score_families, score_labels)
from nbutils.evaluation.planted import (FAMILIES, MAX_FEATURES, WHOLE_SHARE, Family, PlantedFeatures, family_draws,
                                        make_planted_features)
from nbutils.evaluation.real_model import SPACES, compare_spaces, threshold_sweep
from nbutils.evaluation.virtual_neurons import (AMBIGUOUS, MONOSEMANTIC_CLUSTERS, VirtualNeurons,
                                                collect_virtual_examples, make_virtual_neurons, score_virtual_neurons,
                                                virtual_activations, virtual_family_scores)

__all__ = [
    "PlantedFeatures",
    "make_planted_features",
    "DEFAULT_GRID",
    "compare_methods",
    "Family",
    "FAMILIES",
    "MAX_FEATURES",
    "WHOLE_SHARE",
    "TARGET",
    "family_draws",
    "score_labels",
    "score_families",
    "family_summary",
    "choose_default",
    "leave_one_family_out",
    "MONOSEMANTIC_CLUSTERS",
    "AMBIGUOUS",
    "VirtualNeurons",
    "make_virtual_neurons",
    "virtual_activations",
    "collect_virtual_examples",
    "score_virtual_neurons",
    "virtual_family_scores",
    "threshold_sweep",
    "SPACES",
    "compare_spaces",
]
