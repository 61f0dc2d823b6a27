set -x
nvidia-smi --query-gpu=name --format=csv,noheader
pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
timeout 240 python -m pytest -q -x tests/test_efield.py -p no:cacheprovider 2>&1 | tail -15
FASTMODELS_BENCH_RESULTS=$OUT timeout 200 python -m fastmodels.bench.harness electric_image --device cuda 2>&1 | tail -20
