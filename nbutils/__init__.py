"""neuron-embeddings: read polysemantic MLP neurons by clustering their neuron embeddings e = h ⊙ w."""
