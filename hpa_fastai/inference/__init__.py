"""Inference: a trained model loaded (safely by default) and answering, alone or as an ensemble,
and its predictions written out."""
