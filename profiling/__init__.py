"""Per-case running time and memory of a submission, measured as the FLARE24 organizers do.

``python -m profiling -i CASES_DIR -o REPORT_DIR [--docker IMAGE] [-- COMMAND ...]``; the
data flow is staging -> runner (+ sampler thread over sources) -> metrics -> report / plots.
"""
