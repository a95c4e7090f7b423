"""Label vocabularies of the two HPA competitions, with human-readable names."""
from __future__ import annotations

# Zero to GANs - Human Protein Classification (Kaggle, 2020): 10 classes.
Z2G_NAMES = [
    "Mitochondria",
    "Nuclear bodies",
    "Nucleoli",
    "Golgi apparatus",
    "Nucleoplasm",
    "Nucleoli fibrillar center",
    "Cytosol",
    "Plasma membrane",
    "Centrosome",
    "Nuclear speckles",
]

# Human Protein Atlas Image Classification (Kaggle, 2018): 28 classes.
HPA2018_NAMES = [
    "Nucleoplasm",
    "Nuclear membrane",
    "Nucleoli",
    "Nucleoli fibrillar center",
    "Nuclear speckles",
    "Nuclear bodies",
    "Endoplasmic reticulum",
    "Golgi apparatus",
    "Peroxisomes",
    "Endosomes",
    "Lysosomes",
    "Intermediate filaments",
    "Actin filaments",
    "Focal adhesion sites",
    "Microtubules",
    "Microtubule ends",
    "Cytokinetic bridge",
    "Mitotic spindle",
    "Microtubule organizing center",
    "Centrosome",
    "Lipid droplets",
    "Plasma membrane",
    "Cell junctions",
    "Mitochondria",
    "Aggresome",
    "Cytosol",
    "Cytoplasmic bodies",
    "Rods & rings",
]

NAMES = {"z2g": Z2G_NAMES, "hpa2018": HPA2018_NAMES}


def vocab_for(fmt: str) -> list[str]:
    """Class ids as strings ('0', '1', ...): the labels as they are written in the CSVs."""
    return [str(i) for i in range(len(NAMES[fmt]))]


def class_names(fmt: str) -> list[str]:
    return list(NAMES[fmt])
