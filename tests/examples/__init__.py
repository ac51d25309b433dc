"""Tests of the training example (bnjax_examples/, configs/)."""
