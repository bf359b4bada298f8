"""Evaluations of a trained model through the inference API: multiple-choice video QA and needle-in-a-haystack."""
