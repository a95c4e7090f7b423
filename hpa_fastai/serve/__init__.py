"""A local web app on a trained model's safe export (``run.py serve``): drop an image, see its labels,
probabilities, thresholds and heatmaps. Gradio is an optional extra (``.[serve]``)."""
