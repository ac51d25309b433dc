"""One config per experiment of `bnjax_examples.experiments`."""
