"""Write ``digits/digits_8x8.npz``, the handwritten digits the project ships (a one-off run).

    python -m digits.export_digits          # needs scikit-learn (requirements-dev.txt)

Provenance: scikit-learn's bundled ``load_digits`` dataset (``sklearn/datasets/data/
digits.csv.gz``), a copy of the test set of the UCI "Optical Recognition of Handwritten Digits"
dataset by E. Alpaydin and C. Kaynak (1998), https://doi.org/10.24432/C50P49, licensed under
Creative Commons Attribution 4.0 (CC BY 4.0). 1,797 images of 8x8 pixels, each the count of
inked pixels (0-16) in a 4x4 block of a 32x32 bitmap, with their digit 0-9.

The file holds ``images`` ``(1797, 8, 8)`` and ``labels`` ``(1797,)``, both uint8, in
scikit-learn's order, so that the digits model, the nodes and the demo need no scikit-learn at
run time; ``tests/test_digits_data.py`` checks it equals scikit-learn's copy.
"""

from __future__ import annotations

import argparse

import numpy as np

from .data import DATA_PATH


def export(path=DATA_PATH) -> None:
    from sklearn.datasets import load_digits

    bundle = load_digits()
    images = bundle.images.astype(np.uint8)
    if not np.array_equal(images, bundle.images):
        raise ValueError("scikit-learn's digits are not integers 0-16; refusing to round them")
    np.savez_compressed(path, images=images, labels=bundle.target.astype(np.uint8))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DATA_PATH))
    export(parser.parse_args().out)


if __name__ == "__main__":
    main()
