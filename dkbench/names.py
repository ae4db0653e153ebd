"""The bundled kernel's provider name, spelled once for the whole harness.

Rows, specs, the tuner's meta.json and the report all key on it. This module imports nothing, so
that the stages which only read names (a spec, a results CSV for a report) load neither torch nor
the kernels to learn it; `tests/dkbench/test_names.py` fails on a second spelling under dkbench/.
"""

# The provider that runs the bundled Triton kernels (`measure.providers.bundled.BundledKernel`):
# the one a spec's `config` is for, and the rows a density sweep or a tune is about.
BUNDLED_PROVIDER = "dkbench"
