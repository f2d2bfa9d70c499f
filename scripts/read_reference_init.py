"""Print the reference code's initial layer-precision guide locs for a net and seed, then stop; nothing trains.

Ours, not the reference's: it wraps numpyro's ``SVI.init`` so that the reference script (dimarkov/bmr4pml at
72133b4, checked out outside the project) prints the ``layer<k>.weight.c_inv_sqr.loc`` parameters of its first
SVI state and exits. Run it with the reference's environment (experiments/reference/README.md), from its
checkout:

    cd /tmp/bmr4pml && /tmp/refenv/bin/python /path/to/scripts/read_reference_init.py lenet 1

The printed locs are what ``pyrozoo train ... --guide-option init_locs={...}`` takes, one per layer in order.
"""

import json
import runpy
import sys

import numpyro.infer

_original_init = numpyro.infer.SVI.init


def _print_and_stop(self, *args, **kwargs):
    params = self.get_params(_original_init(self, *args, **kwargs))
    locs = {n: float(v.reshape(-1)[0]) for n, v in sorted(params.items()) if n.endswith("c_inv_sqr.loc")}
    print("REFINIT " + json.dumps(locs), flush=True)
    raise SystemExit(0)


if __name__ == "__main__":
    net, seed = sys.argv[1], sys.argv[2]
    numpyro.infer.SVI.init = _print_and_stop
    sys.argv = ["image_classification.py", "-n", net, "-m", "BMR-S&S", "--device", "cpu"]
    sys.argv += ["-ds", "fashion_mnist", "--seed", seed]
    runpy.run_path("scripts/image_classification.py", run_name="__main__")
