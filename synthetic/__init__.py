"""FLARE-like synthetic CT: trunk anatomy with irregular lesions, labels and FLARE24 folders.

Deterministic from a seed, from tiny test volumes to 512x512x554 benchmark cases::

    from synthetic import generate_case, write_case
    case = generate_case(seed=0, shape_zyx=(48, 96, 96), kind="partial")
    write_case(case, "FLARE24_0001", "out/imagesTr", "out/labelsTr")

Command line: ``python -m synthetic flare|test|table4 -o OUT``.
"""

from synthetic.case import KINDS, SyntheticCase, generate_case
from synthetic.dataset import (
    case_name,
    case_seed,
    table4_cases,
    write_case,
    write_flare_folder,
    write_table4_folder,
    write_test_folder,
)

__all__ = [
    "KINDS",
    "SyntheticCase",
    "case_name",
    "case_seed",
    "generate_case",
    "table4_cases",
    "write_case",
    "write_flare_folder",
    "write_table4_folder",
    "write_test_folder",
]
