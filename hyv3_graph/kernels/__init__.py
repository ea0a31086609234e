"""One module per kernel: graph wrappers of our Mojo op (`kernels/<name>.mojo`), its MAX built-in peer, and
its numpy reference (the spec the fuzz tests hold the op to). Fuzz test: `tests/test_<name>.py`;
bench case: `bench/cases/<name>.py`."""

from pathlib import Path

MOJO_KERNELS = Path(__file__).resolve().parents[2] / "kernels"
